"""Per-tenant quotas: concurrent jobs and stored bytes. Over quota is 429 with Retry-After.

Stored bytes are everything the tenant makes us keep: every object in its space (models,
datasets, jobs' records and artifacts, idempotency records, presigned uploads' data), plus the
size limit of each presigned upload still pending (``service.uploads.incoming``)."""

from __future__ import annotations

from service.api.context import services, space
from service.errors import ServiceError
from service.jobs.record import utcnow
from service.uploads import incoming


class QuotaExceeded(ServiceError):
    status, code = 429, "quota_exceeded"


def check_job_quota() -> None:
    limit = services().settings.quota_concurrent_jobs
    if limit and len(space().jobs.active_ids()) >= limit:
        raise QuotaExceeded(
            f"the tenant already has {limit} queued or running jobs (its quota); retry when one finishes",
            headers={"Retry-After": "30"},
        )


def stored_bytes(completing: str | None = None) -> int:
    """Everything the calling tenant has stored or reserved (``completing``: a presigned
    upload being completed, whose reservation is its data, already counted)."""
    store = space().store
    return store.total_bytes("") + incoming.reserved_bytes(store, utcnow(), completing)


def check_storage_quota(adding: int, completing: str | None = None) -> None:
    """429 if storing ``adding`` more bytes would take the tenant past its quota (0: only
    when it is past it already, e.g. before a job adds artifacts)."""
    limit = services().settings.quota_stored_bytes
    if not limit:
        return
    used = stored_bytes(completing)
    if used + adding > limit or (adding == 0 and used >= limit):
        raise QuotaExceeded(
            f"storing {adding} more bytes would exceed the tenant's quota of {limit} bytes "
            f"({used} used or reserved); delete models, datasets or jobs first",
            headers={"Retry-After": "3600"},
        )
