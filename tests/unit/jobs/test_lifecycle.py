"""The named transitions on a job store held in memory (compare-and-swap on ETags)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from service.errors import NotFound, PreconditionFailed
from service.jobs import lifecycle
from service.jobs.record import Job, JobState, new_job_id, utcnow
from service.jobs.store import JobStore
from service.storage.s3 import StoredObject


class MemoryStore:
    """The part of ``ObjectStore`` a ``JobStore`` uses; ``before_put`` runs before each
    conditional write (another writer winning the race)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.before_put: Callable[[], None] | None = None

    def get(self, key: str) -> StoredObject | None:
        body = self.objects.get(key)
        return None if body is None else StoredObject(key, body, _etag(body), {})

    def put(self, key: str, body: bytes, *, content_type: str = "application/json",
            if_none_match: bool = False, if_match: str | None = None,
            metadata: dict[str, str] | None = None) -> str:
        if if_match is not None and self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        current = self.objects.get(key)
        if (if_none_match and current is not None) or (
            if_match is not None and (current is None or _etag(current) != if_match)
        ):
            raise PreconditionFailed(f"{key} changed")
        self.objects[key] = body
        return _etag(body)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def list_keys(self, prefix: str, *, start_after: str | None = None,
                  limit: int = 1000) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))[:limit]


def _etag(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()  # noqa: S324 - an ETag, as S3 makes them


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def jobs(store: MemoryStore) -> JobStore:
    return JobStore(store)  # type: ignore[arg-type]


def _job(jobs: JobStore, **changes: Any) -> Job:
    job = Job(id=new_job_id(), model_id="mdl_" + "0" * 32, device="host",
              recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow())
    jobs.create(job)
    if changes:
        jobs.update(job.id, lambda j: j.model_copy(update=changes))
    return jobs.get(job.id)


def _claim(jobs: JobStore, job_id: str, worker: str = "w1", max_attempts: int = 3,
           stale_seconds: float = 45.0) -> lifecycle.Outcome:
    return lifecycle.claim(jobs, job_id, worker, max_attempts=max_attempts,
                           stale_seconds=stale_seconds)


def test_claim_runs_a_queued_job_for_its_worker(jobs: JobStore) -> None:
    job = _job(jobs)
    claim = _claim(jobs, job.id)
    assert claim.written and not claim.ended
    assert claim.job.state is JobState.running and claim.job.worker == "w1"
    assert claim.job.attempts == 1 and claim.job.stage == "download"
    assert jobs.get(job.id) == claim.job


def test_claim_leaves_a_job_a_live_worker_runs(jobs: JobStore) -> None:
    job = _job(jobs)
    _claim(jobs, job.id, "w1")
    other = _claim(jobs, job.id, "w2")
    assert not other.written and other.job.worker == "w1"
    # ... but takes it once that worker stopped heart-beating.
    taken = _claim(jobs, job.id, "w2", stale_seconds=-1)
    assert taken.written and taken.job.worker == "w2" and taken.job.attempts == 2


def test_claim_ends_a_cancelled_or_exhausted_job(jobs: JobStore) -> None:
    cancelled = _claim(jobs, _job(jobs, cancel_requested=True).id)
    assert cancelled.ended and cancelled.job.state is JobState.cancelled
    lost = _claim(jobs, _job(jobs, attempts=3).id)
    assert lost.ended and lost.job.state is JobState.failed
    assert lost.job.error is not None and lost.job.error.code == "worker_lost"
    again = _claim(jobs, lost.job.id)
    assert not again.written and not again.ended


def test_claim_of_a_missing_record_raises(jobs: JobStore) -> None:
    with pytest.raises(NotFound):
        _claim(jobs, new_job_id())


def test_heartbeat_moves_progress_forward_while_the_job_is_ours(jobs: JobStore) -> None:
    job = _claim(jobs, _job(jobs).id).job
    beat = lifecycle.heartbeat(jobs, job.id, "w1", "engine:quantize", 0.5)
    assert beat is not None and beat.stage == "engine:quantize" and beat.progress == 0.5
    back = lifecycle.heartbeat(jobs, job.id, "w1", "upload", 0.2)
    assert back is not None and back.progress == 0.5  # never backwards
    top = lifecycle.heartbeat(jobs, job.id, "w1", "upload", 1.0)
    assert top is not None and top.progress == 0.97  # 1.0 only when it succeeds
    assert lifecycle.heartbeat(jobs, job.id, "w2", "upload", 0.99) is None
    assert lifecycle.heartbeat(jobs, new_job_id(), "w1", "upload", 0.5) is None


def test_succeed_only_by_the_owning_worker(jobs: JobStore) -> None:
    job = _claim(jobs, _job(jobs).id).job
    not_ours = lifecycle.succeed(jobs, job.id, "w2", result={}, artifacts=["x"])
    assert not_ours.state is JobState.running
    done = lifecycle.succeed(jobs, job.id, "w1", result={"size_ratio": 4.0},
                             artifacts=["report.json", "model.onnx"])
    assert done.state is JobState.succeeded and done.progress == 1.0
    assert done.artifacts == ["model.onnx", "report.json"]


def test_fail_and_mark_cancelled_leave_finished_jobs_alone(jobs: JobStore) -> None:
    job = _claim(jobs, _job(jobs).id).job
    failed = lifecycle.fail(jobs, job.id, "timeout", "too slow", {"limit": 5})
    assert failed.state is JobState.failed and failed.error is not None
    assert failed.error.details == {"limit": 5}
    assert lifecycle.mark_cancelled(jobs, job.id).state is JobState.failed
    assert lifecycle.fail(jobs, job.id, "other", "other").error == failed.error
    other = _claim(jobs, _job(jobs).id).job
    assert lifecycle.mark_cancelled(jobs, other.id).state is JobState.cancelled


def test_cancel_ends_a_queued_job_and_flags_a_running_one(jobs: JobStore) -> None:
    queued = lifecycle.cancel(jobs, _job(jobs).id)
    assert queued.ended and queued.job.state is JobState.cancelled
    assert not lifecycle.cancel(jobs, queued.job.id).written
    running = _claim(jobs, _job(jobs).id).job
    flagged = lifecycle.cancel(jobs, running.id)
    assert flagged.written and not flagged.ended
    assert flagged.job.state is JobState.running and flagged.job.cancel_requested
    assert not lifecycle.cancel(jobs, running.id).written  # asked once


def test_requeue_lost_only_if_untouched_since_seen(jobs: JobStore) -> None:
    job = _claim(jobs, _job(jobs).id).job
    seen = job.updated_at
    assert seen is not None
    lifecycle.heartbeat(jobs, job.id, "w1", "engine", 0.3)  # alive after all
    assert lifecycle.requeue_lost(jobs, job.id, seen) is None
    current = jobs.get(job.id)
    assert current.updated_at is not None
    back = lifecycle.requeue_lost(jobs, job.id, current.updated_at)
    assert back is not None and back.state is JobState.queued and back.worker is None
    assert back.message == "worker lost; retrying"


def test_requeue_queued_restarts_the_wait(jobs: JobStore) -> None:
    job = _job(jobs)
    seen = job.updated_at or job.created_at
    touched = lifecycle.requeue_queued(jobs, job.id, seen)
    assert touched is not None and touched.state is JobState.queued
    assert (touched.updated_at or seen) > seen
    assert lifecycle.requeue_queued(jobs, job.id, seen) is None  # another reconciler did
    running = _claim(jobs, _job(jobs).id).job
    assert lifecycle.requeue_queued(jobs, running.id, running.updated_at or seen) is None


def test_a_lost_race_is_decided_on_the_fresh_record(jobs: JobStore, store: MemoryStore) -> None:
    """The worker's claim races the user's cancel: the claim re-reads and ends the job."""
    job = _job(jobs)

    def user_cancels() -> None:
        lifecycle.cancel(jobs, job.id)

    store.before_put = user_cancels
    claim = _claim(jobs, job.id)
    assert claim.job.state is JobState.cancelled
    assert not claim.written and not claim.ended  # the cancel ended it, not the claim


def test_is_stale() -> None:
    job = Job(id=new_job_id(), model_id="m", device="host", recipe="auto",
              created_at=utcnow() - timedelta(seconds=60))
    assert lifecycle.is_stale(job, 45) and not lifecycle.is_stale(job, 90)
