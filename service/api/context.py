"""What the API's views share: the services built by ``create_app`` from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from service.config import Settings
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.storage.s3 import S3ObjectStore
from service.uploads.store import UploadStore
from service.worker.queue import JobQueue


@dataclass
class Services:
    settings: Settings
    store: S3ObjectStore
    jobs: JobStore
    uploads: UploadStore
    queue: JobQueue
    metrics: ServiceMetrics


def services() -> Services:
    svc: Services = current_app.extensions["edgepress"]
    return svc
