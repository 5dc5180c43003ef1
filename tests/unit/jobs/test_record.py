from datetime import timedelta

import pytest

from service.errors import Conflict
from service.jobs.record import Job, JobState, new_job_id, utcnow


def make_job(**kw):  # type: ignore[no-untyped-def]
    base = dict(id=new_job_id(), model_id="mdl_" + "0" * 32, device="host",
                recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow())
    base.update(kw)
    return Job(**base)


def test_happy_path_sets_timestamps_and_progress() -> None:
    job = make_job()
    running = job.transition(JobState.running)
    assert running.started_at is not None and running.finished_at is None
    done = running.transition(JobState.succeeded, result={"size_ratio": 4.0})
    assert done.state is JobState.succeeded
    assert done.progress == 1.0 and done.stage == "succeeded"
    assert done.finished_at is not None and done.finished_at >= done.started_at


@pytest.mark.parametrize("terminal", [JobState.succeeded, JobState.failed, JobState.cancelled])
def test_terminal_states_never_change(terminal: JobState) -> None:
    job = make_job().transition(JobState.running).transition(terminal)
    for target in JobState:
        with pytest.raises(Conflict):
            job.transition(target)


def test_queued_cannot_succeed_directly() -> None:
    with pytest.raises(Conflict):
        make_job().transition(JobState.succeeded)


def test_running_can_be_handed_back_and_reclaimed() -> None:
    job = make_job().transition(JobState.running, attempts=1)
    back = job.transition(JobState.queued)
    assert back.state is JobState.queued
    again = back.transition(JobState.running, attempts=2)
    assert again.started_at == job.started_at  # the first start is kept


def test_ids_sort_by_creation_time() -> None:
    ids = [new_job_id() for _ in range(3)]
    assert len(set(ids)) == 3
    assert all(len(i) == 28 and i.startswith("job_") for i in ids)
    assert int(ids[0][4:16], 16) <= int(ids[-1][4:16], 16)


def test_public_view_hides_internal_fields() -> None:
    job = make_job(callback_url="https://example.invalid/hook", worker="w1",
                   created_at=utcnow() - timedelta(seconds=1))
    public = job.public()
    assert "worker" not in public and "callback_url" not in public
    assert "cancel_requested" not in public
    assert "error" not in public  # only present on failure
    assert public["state"] == "queued" and public["progress"] == 0.0
