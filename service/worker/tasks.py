"""The Celery task: ``edgepress.run_job(job_id)`` and the reconciler.

The task takes an id, re-reads the record and is idempotent (``JobRunner``). Only transient
store/broker errors are retried. The reconciler runs in every worker's main process: it
re-enqueues jobs queued too long (a message lost with the broker) and hands back running jobs
whose worker stopped heart-beating (a worker killed mid-job); conditional writes make several
reconcilers safe.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from service.config import Settings
from service.errors import NotFound, PreconditionFailed, Unavailable
from service.jobs.models import Job, JobState, utcnow
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.storage.s3 import make_store
from service.worker.celery_app import RUN_JOB_TASK
from service.worker.queue import JobQueue
from service.worker.runner import JobRunner

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings, metrics: ServiceMetrics) -> None:
    runner_holder: dict[str, JobRunner] = {}

    def runner() -> JobRunner:
        # Built lazily in the process that runs tasks (after the pool forks).
        if "r" not in runner_holder:
            runner_holder["r"] = JobRunner(settings, make_store(settings), metrics)
        return runner_holder["r"]

    @app.task(
        name=RUN_JOB_TASK,
        bind=True,
        acks_late=True,
        autoretry_for=(Unavailable,),
        retry_backoff=2,
        retry_backoff_max=60,
        max_retries=10,
    )
    def run_job(self: Any, job_id: str) -> None:
        runner().run(job_id)


class Reconciler:
    """Finds jobs the broker lost or whose worker died, and enqueues them again."""

    def __init__(self, settings: Settings, jobs: JobStore, queue: JobQueue) -> None:
        self.settings = settings
        self.jobs = jobs
        self.queue = queue
        self._stop = threading.Event()

    def run_once(self) -> list[str]:
        """One pass; returns the ids re-enqueued."""
        s = self.settings
        requeued: list[str] = []
        for job_id in self.jobs.active_ids():
            try:
                job = self.jobs.get(job_id)
            except NotFound:
                self.jobs.clear_active(job_id)
                continue
            if job.state.terminal:
                self.jobs.clear_active(job_id)
                continue
            now = utcnow()
            seen = job.updated_at or job.created_at
            age = (now - seen).total_seconds()
            if job.state is JobState.queued and age > s.job_queued_requeue_seconds:
                action = "requeue-queued"
            elif job.state is JobState.running and age > s.job_stale_seconds:
                action = "requeue-lost"
            else:
                continue

            def change(current: Job, action: str = action, seen: Any = seen) -> Job | None:
                if (current.updated_at or current.created_at) != seen or current.state.terminal:
                    return None  # someone touched it since we looked: not lost
                if action == "requeue-lost":
                    return current.transition(
                        JobState.queued,
                        stage="queued",
                        message="worker lost; retrying",
                        worker=None,
                    )
                return current.model_copy(update={"updated_at": utcnow()})

            try:
                updated = self.jobs.update(job_id, change)
            except (PreconditionFailed, NotFound):
                continue
            if updated.updated_at == seen:
                continue
            try:
                self.queue.enqueue(job_id)
                requeued.append(job_id)
                log.warning("reconciler: %s job %s", action, job_id)
            except Unavailable:
                return requeued
        return requeued

    def loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_seconds):
            try:
                self.run_once()
            except Exception:  # never let the reconciler thread die
                log.exception("reconciler pass failed")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.loop, name="edgepress-reconciler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
