"""JobStore on the real S3 server: conditional updates, newest-first pagination."""

import threading
import time

import pytest

from service.jobs import events as events_mod
from service.jobs.events import JobEvents
from service.jobs.record import Job, JobState, new_job_id, utcnow
from service.jobs.store import JobStore
from service.storage.s3 import make_store

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack


@pytest.fixture
def jobs(isolated_settings):  # type: ignore[no-untyped-def]
    return JobStore(make_store(isolated_settings))


def new_job() -> Job:
    return Job(id=new_job_id(), model_id="mdl_" + "1" * 32, device="host",
               recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow())


def test_concurrent_updates_are_not_lost(jobs) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create(new_job())

    def bump() -> None:
        for _ in range(5):
            jobs.update(job.id, lambda j: j.model_copy(update={"attempts": j.attempts + 1}),
                        attempts=50)

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert jobs.get(job.id).attempts == 15


def test_only_one_claim_wins(jobs) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create(new_job())
    winners: list[str] = []

    def claim(name: str) -> None:
        def change(j: Job) -> Job | None:
            if j.state is not JobState.queued:
                return None
            return j.transition(JobState.running, worker=name)

        result = jobs.update(job.id, change, attempts=50)
        if result.worker == name:
            winners.append(name)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert jobs.get(job.id).worker == winners[0]


def test_list_newest_first_with_cursor(jobs) -> None:  # type: ignore[no-untyped-def]
    import time

    created = []
    for _ in range(5):
        created.append(jobs.create(new_job()).id)
        time.sleep(0.002)
    page1, cursor = jobs.page(limit=2)
    assert [j.id for j in page1] == created[::-1][:2]
    assert cursor
    page2, cursor2 = jobs.page(limit=2, cursor=cursor)
    assert [j.id for j in page2] == created[::-1][2:4]
    page3, cursor3 = jobs.page(limit=2, cursor=cursor2)
    assert [j.id for j in page3] == created[::-1][4:]
    assert cursor3 is None


def test_terminal_update_clears_active_marker(jobs) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create(new_job())
    assert job.id in jobs.active_ids()
    jobs.update(job.id, lambda j: j.transition(JobState.cancelled))
    assert job.id not in jobs.active_ids()


def _later(seconds: float, fn) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        time.sleep(seconds)
        fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_long_poll_returns_on_the_change_notice(isolated_settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Re-checks every 60 s: only the Redis notice can end this wait early.
    monkeypatch.setattr(events_mod, "RECHECK_SECONDS", 60.0)
    events = JobEvents(isolated_settings.broker_url)
    assert events.live
    jobs = JobStore(make_store(isolated_settings), events)
    job = jobs.create(new_job())
    _, tag = jobs.get_with_etag(job.id)
    writer = _later(0.5, lambda: jobs.update(
        job.id, lambda j: j.model_copy(update={"stage": "pass:quantize_dynamic"})))
    started = time.monotonic()
    changed, new_tag = jobs.get_if_changed(job.id, tag, 30)
    writer.join()
    assert changed.stage == "pass:quantize_dynamic" and new_tag != tag
    assert time.monotonic() - started < 20, "the notice, not the 30 s deadline, ended the wait"


def test_long_poll_answers_at_once_when_already_changed_or_finished(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    events = JobEvents(None)  # no Redis: re-checks only
    jobs = JobStore(make_store(isolated_settings), events)
    job = jobs.create(new_job())
    started = time.monotonic()
    got, tag = jobs.get_if_changed(job.id, '"stale"', 30)
    assert got.id == job.id
    done = jobs.update(job.id, lambda j: j.transition(JobState.cancelled))
    got, tag2 = jobs.get_if_changed(job.id, jobs.get_with_etag(job.id)[1], 30)
    assert got.state is done.state and tag2 != tag
    assert time.monotonic() - started < 20


def test_long_poll_without_notices_sees_the_change_by_rereading(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    jobs = JobStore(make_store(isolated_settings))  # no notices: writes publish nothing
    job = jobs.create(new_job())
    _, tag = jobs.get_with_etag(job.id)
    writer = _later(0.5, lambda: jobs.update(
        job.id, lambda j: j.model_copy(update={"progress": 0.5})))
    started = time.monotonic()
    changed, _ = jobs.get_if_changed(job.id, tag, 30)
    writer.join()
    assert changed.progress == 0.5 and time.monotonic() - started < 20
    # Nothing changes: answered with the same record when the time is up.
    same, same_tag = jobs.get_if_changed(job.id, jobs.get_with_etag(job.id)[1], 0.3)
    assert same.progress == 0.5 and same_tag == jobs.get_with_etag(job.id)[1]
