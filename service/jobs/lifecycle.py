"""The named transitions of a stored job, each one compare-and-swap on its record.

The API and the worker move a job only through these functions; each re-reads the record,
decides on what it finds (another writer may have moved the job since the caller looked) and
writes with ``JobStore.update`` (If-Match), retrying a lost race on the fresh record.

- API: ``cancel`` (the user's request).
- Worker: ``claim``, ``heartbeat`` (stage and progress; also the worker's proof of life),
  ``succeed``, ``fail``, ``mark_cancelled`` (after it stopped a cancelled job's engine).
- Reconciler: ``requeue_lost`` (running, worker stopped heart-beating) and ``requeue_queued``
  (queued too long: the broker lost its message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.errors import NotFound
from service.jobs.record import Job, JobError, JobState, utcnow
from service.jobs.store import JobStore

CANCELLED_MESSAGE = "cancelled by the user"


@dataclass(frozen=True)
class Outcome:
    """The record after a transition, and whether this call wrote it."""

    job: Job
    written: bool

    @property
    def ended(self) -> bool:
        """This call wrote the job's terminal state (count it, send its webhook)."""
        return self.written and self.job.state.terminal


def _swap(jobs: JobStore, job_id: str, change: Callable[[Job], Job | None]) -> Outcome:
    written = False

    def attempt(job: Job) -> Job | None:
        nonlocal written
        new = change(job)
        written = new is not None  # the last attempt is the one whose answer stands
        return new

    job = jobs.update(job_id, attempt)
    return Outcome(job, written)


def is_stale(job: Job, stale_seconds: float) -> bool:
    """True when the record was not refreshed for ``stale_seconds`` (its worker is lost)."""
    seen = job.updated_at or job.started_at or job.created_at
    return (utcnow() - seen).total_seconds() > stale_seconds


def _owned(job: Job, worker: str) -> bool:
    return job.state is JobState.running and job.worker == worker


# -- API -------------------------------------------------------------------------------------
def cancel(jobs: JobStore, job_id: str) -> Outcome:
    """The user's cancel: a queued job is cancelled at once (``ended``); a running one is
    flagged ``cancel_requested`` and its worker stops it; a finished one is left as it is."""

    def change(job: Job) -> Job | None:
        if job.state.terminal:
            return None
        if job.state is JobState.queued:
            return job.transition(JobState.cancelled, message=CANCELLED_MESSAGE)
        if job.cancel_requested:
            return None
        return job.model_copy(update={"cancel_requested": True, "updated_at": utcnow()})

    return _swap(jobs, job_id, change)


# -- worker ----------------------------------------------------------------------------------
def claim(
    jobs: JobStore, job_id: str, worker: str, *, max_attempts: int, stale_seconds: float
) -> Outcome:
    """Take the job for ``worker``: running and ours afterwards unless it is finished, runs
    on a live worker (a duplicate delivery), was cancelled meanwhile or used up its attempts
    (the last two end it here: ``ended``). Raises ``NotFound`` without a record."""

    def change(job: Job) -> Job | None:
        if job.state.terminal:
            return None
        if job.cancel_requested:
            return job.transition(JobState.cancelled, message=CANCELLED_MESSAGE)
        if job.state is JobState.running and not is_stale(job, stale_seconds) \
                and job.worker != worker:
            return None  # a live worker runs it; a duplicate delivery ends here
        attempts = job.attempts + 1
        if attempts > max_attempts:
            return job.transition(
                JobState.failed,
                error=JobError(
                    code="worker_lost",
                    message=f"the job's worker was lost {job.attempts} times; giving up",
                ),
            )
        return job.transition(
            JobState.running,
            attempts=attempts,
            worker=worker,
            stage="download",  # the first thing a claimed job does; no record write of its own
            progress=0.0,
            message=None,
        )

    return _swap(jobs, job_id, change)


def heartbeat(jobs: JobStore, job_id: str, worker: str, stage: str, fraction: float) -> Job | None:
    """Record the running job's stage and progress (never backwards, below 1 until it
    succeeds). The record while it is still ``worker``'s; None once it is not (finished,
    deleted, or handed to another worker after this one looked lost)."""

    def change(job: Job) -> Job | None:
        if not _owned(job, worker):
            return None
        return job.model_copy(
            update={
                "stage": stage,
                "progress": max(job.progress, min(fraction, 0.97)),
                "updated_at": utcnow(),
            }
        )

    try:
        job = jobs.update(job_id, change)
    except NotFound:
        return None
    return job if _owned(job, worker) else None


def succeed(
    jobs: JobStore, job_id: str, worker: str, *, result: dict[str, Any], artifacts: list[str]
) -> Job:
    """Mark the job succeeded with its summary and artifact names, if it is still ``worker``'s
    (otherwise the record as it is)."""

    def change(job: Job) -> Job | None:
        if not _owned(job, worker):
            return None
        return job.transition(JobState.succeeded, result=result, artifacts=sorted(artifacts))

    return jobs.update(job_id, change)


def fail(
    jobs: JobStore, job_id: str, code: str, message: str, details: dict[str, Any] | None = None
) -> Job:
    """Mark the job failed with ``code``/``message`` unless it is finished already."""

    def change(job: Job) -> Job | None:
        if job.state.terminal:
            return None
        return job.transition(
            JobState.failed, error=JobError(code=code, message=message, details=details)
        )

    return jobs.update(job_id, change)


def mark_cancelled(jobs: JobStore, job_id: str) -> Job:
    """Mark the job cancelled (its worker stopped the engine) unless it is finished already."""

    def change(job: Job) -> Job | None:
        if job.state.terminal:
            return None
        return job.transition(JobState.cancelled, message=CANCELLED_MESSAGE)

    return jobs.update(job_id, change)


# -- reconciler ------------------------------------------------------------------------------
def requeue_lost(jobs: JobStore, job_id: str, seen: datetime) -> Job | None:
    """Hand a running job whose record was last written at ``seen`` back to the queue (its
    worker is lost). None if the record changed since (someone is alive after all)."""

    def change(job: Job) -> Job | None:
        if not _untouched(job, seen) or job.state is not JobState.running:
            return None
        return job.transition(
            JobState.queued, stage="queued", message="worker lost; retrying", worker=None
        )

    done = _swap(jobs, job_id, change)
    return done.job if done.written else None


def requeue_queued(jobs: JobStore, job_id: str, seen: datetime) -> Job | None:
    """Restart the wait of a job queued since ``seen`` (its message is sent again now). None
    if the record changed since (claimed, cancelled, or re-enqueued by another reconciler)."""

    def change(job: Job) -> Job | None:
        if not _untouched(job, seen) or job.state is not JobState.queued:
            return None
        return job.model_copy(update={"updated_at": utcnow()})

    done = _swap(jobs, job_id, change)
    return done.job if done.written else None


def _untouched(job: Job, seen: datetime) -> bool:
    return (job.updated_at or job.created_at) == seen and not job.state.terminal
