"""What the API's views share: the services built by ``create_app`` from the settings, and
the calling tenant's space in the store."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from flask import current_app, g

from service.config import Settings
from service.jobs.events import JobEvents
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.queue import JobQueue
from service.storage.s3 import S3ObjectStore
from service.tenants import DEFAULT_TENANT, tenant_prefix
from service.uploads.store import UploadStore


@dataclass
class Services:
    settings: Settings
    root_store: S3ObjectStore
    queue: JobQueue
    metrics: ServiceMetrics
    events: JobEvents
    # Long-polled status requests this process may hold at once (None: none are held).
    waiters: threading.BoundedSemaphore | None = None
    # Upload inspections this process runs at once (``EDGEPRESS_INSPECT_CONCURRENCY``).
    inspections: threading.BoundedSemaphore | None = None


@dataclass
class TenantSpace:
    """One tenant's view of the store: ids of other tenants simply do not exist here."""

    tenant: str
    store: S3ObjectStore
    jobs: JobStore
    uploads: UploadStore


def services() -> Services:
    svc: Services = current_app.extensions["edgepress"]
    return svc


def space_for(root: S3ObjectStore, tenant: str, events: JobEvents | None = None) -> TenantSpace:
    store = root.scoped(tenant_prefix(tenant))
    return TenantSpace(tenant, store, JobStore(store, events), UploadStore(store))


def space() -> TenantSpace:
    """The authenticated tenant's space (set by the auth hook; "default" without keys)."""
    if "edgepress_space" not in g:
        svc = services()
        g.edgepress_space = space_for(
            svc.root_store, g.get("tenant", DEFAULT_TENANT), svc.events
        )
    current: TenantSpace = g.edgepress_space
    return current
