"""Per-tenant quotas: concurrent jobs and stored bytes. Over quota is 429 with Retry-After."""

from __future__ import annotations

from service.api.context import services, space
from service.errors import ServiceError
from service.uploads.records import UPLOAD_KINDS


class QuotaExceeded(ServiceError):
    status, code = 429, "quota_exceeded"


def check_job_quota() -> None:
    limit = services().settings.quota_concurrent_jobs
    if limit and len(space().jobs.active_ids()) >= limit:
        raise QuotaExceeded(
            f"the tenant already has {limit} queued or running jobs (its quota); retry when one finishes",
            headers={"Retry-After": "30"},
        )


def check_storage_quota(incoming: int) -> None:
    limit = services().settings.quota_stored_bytes
    if not limit:
        return
    store = space().store
    used = sum(store.total_bytes(f"{kind.folder}/") for kind in UPLOAD_KINDS.values())
    if used + incoming > limit:
        raise QuotaExceeded(
            f"storing {incoming} more bytes would exceed the tenant's quota of {limit} bytes "
            f"({used} used); delete models or datasets first",
            headers={"Retry-After": "3600"},
        )
