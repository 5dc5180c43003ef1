"""The job record and its state machine.

    queued ──▶ running ──▶ succeeded
       │          │  ╲───▶ failed
       │          ╰─────▶ cancelled
       ╰──────▶ failed | cancelled

``running → queued`` hands a job back for redelivery after its worker was lost, and
``running → running`` is a new worker claiming it; ``attempts`` counts the claims.
Terminal states never change again. The named transitions that move a stored record
between these states are ``service.jobs.lifecycle``.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import Conflict


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.failed, JobState.cancelled}),
    JobState.running: frozenset(
        {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.queued, JobState.running}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class JobError(BaseModel):
    """Why a job failed: a stable machine ``code`` and a human ``message``."""

    code: str
    message: str
    details: dict[str, Any] | None = None


class Job(BaseModel):
    """A compression job as stored in the object store (the record is the truth)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    state: JobState = JobState.queued
    stage: str = "queued"
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    message: str | None = None
    model_id: str
    dataset_id: str | None = None
    device: str | dict[str, Any]
    recipe: list[dict[str, Any]] | str
    constraints: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)  # given shapes/values by input name
    callback_url: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    result: dict[str, Any] | None = None
    error: JobError | None = None
    artifacts: list[str] = Field(default_factory=list)

    def transition(self, target: JobState, **changes: Any) -> Job:
        """A copy in state ``target`` with ``changes``; raises ``Conflict`` if not allowed."""
        if target not in _ALLOWED[self.state]:
            raise Conflict(
                f"job {self.id} cannot go from {self.state.value} to {target.value}",
                code="invalid_transition",
            )
        now = utcnow()
        data: dict[str, Any] = {"state": target, "updated_at": now, **changes}
        if target is JobState.running and self.started_at is None:
            data.setdefault("started_at", now)
        if target.terminal:
            data.setdefault("finished_at", now)
            data.setdefault("stage", target.value)
            if target is JobState.succeeded:
                data.setdefault("progress", 1.0)
        return self.model_copy(update=data)

    def public(self) -> dict[str, Any]:
        """The job resource as the API shows it."""
        out = self.model_dump(
            mode="json", exclude={"worker", "cancel_requested", "callback_url"}, exclude_none=False
        )
        if self.error is None:
            out.pop("error")
        return out


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """``job_`` + 12 hex digits of milliseconds + 12 random hex digits: sortable by time."""
    return f"job_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"
