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

from service import webhooks
from service.config import Settings
from service.errors import NotFound, PreconditionFailed, Unavailable
from service.jobs import lifecycle
from service.jobs.events import JobEvents
from service.jobs.record import JobState, utcnow
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.queue import RUN_JOB_TASK, WEBHOOK_TASK, JobQueue
from service.storage.s3 import S3ObjectStore, make_store
from service.tenants import DEFAULT_TENANT, TENANT_NAME, tenant_prefix
from service.uploads import incoming
from service.worker.runner import JobRunner

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings, metrics: ServiceMetrics) -> None:
    stores: dict[str, S3ObjectStore] = {}

    def runner(tenant: str) -> JobRunner:
        # The client is built lazily in the process that runs tasks (after the pool forks).
        if "root" not in stores:
            stores["root"] = make_store(settings)
        return JobRunner(settings, stores["root"].scoped(tenant_prefix(tenant)), metrics, tenant=tenant)

    @app.task(
        name=RUN_JOB_TASK,
        bind=True,
        acks_late=True,
        autoretry_for=(Unavailable,),
        retry_backoff=2,
        retry_backoff_max=60,
        max_retries=10,
    )
    def run_job(self: Any, job_id: str, tenant: str = DEFAULT_TENANT) -> None:
        if not TENANT_NAME.fullmatch(tenant):
            log.warning("dropping a message with an invalid tenant %r", tenant)
            return
        final = runner(tenant).run(job_id)
        if final is not None and final.state.terminal and final.callback_url and final.finished_at:
            JobQueue(app, settings).enqueue_webhook(job_id, tenant)

    @app.task(name=WEBHOOK_TASK, acks_late=True)
    def deliver_webhook(job_id: str, tenant: str, attempt: int = 1) -> None:
        if not TENANT_NAME.fullmatch(tenant):
            return
        if "root" not in stores:
            stores["root"] = make_store(settings)
        try:
            job = JobStore(stores["root"].scoped(tenant_prefix(tenant))).get(job_id)
        except NotFound:
            return
        if not job.callback_url or not job.state.terminal:
            return
        payload = {"event": f"job.{job.state.value}", "job": job.public()}
        try:
            status = webhooks.deliver(job.callback_url, payload, settings, tenant)
            outcome = "delivered" if 200 <= status < 300 else f"http_{status}"
        except webhooks.CallbackRefused as exc:
            log.warning("webhook for %s refused: %s", job_id, exc.message)
            metrics.webhooks.labels("refused").inc()
            return
        except Exception as exc:  # network errors: retry
            outcome = type(exc).__name__
        if outcome == "delivered":
            metrics.webhooks.labels("delivered").inc()
            return
        if attempt >= settings.webhook_max_attempts:
            log.warning("webhook for %s gave up after %d attempts (%s)", job_id, attempt, outcome)
            metrics.webhooks.labels("failed").inc()
            return
        metrics.webhooks.labels("retried").inc()
        JobQueue(app, settings).enqueue_webhook(
            job_id, tenant, attempt + 1, countdown=min(2.0 ** attempt, 300.0)
        )


class Reconciler:
    """Finds jobs the broker lost or whose worker died, and enqueues them again."""

    def __init__(self, settings: Settings, root: S3ObjectStore, queue: JobQueue) -> None:
        self.settings = settings
        self.root = root
        self.queue = queue
        self._stop = threading.Event()

    def run_once(self) -> list[str]:
        """One pass over every tenant; returns the ids re-enqueued. Also the lifecycle of
        ``incoming/``: presigned uploads never completed are deleted once expired."""
        requeued: list[str] = []
        for tenant in self.root.list_prefixes("tenants/"):
            if TENANT_NAME.fullmatch(tenant):
                space = self.root.scoped(tenant_prefix(tenant))
                jobs = JobStore(space, JobEvents.from_settings(self.settings))
                requeued += self._reconcile(tenant, jobs)
                try:
                    incoming.expire(space, utcnow())
                except Unavailable:
                    log.warning("reconciler: store unavailable while expiring uploads")
        return requeued

    def _reconcile(self, tenant: str, jobs: JobStore) -> list[str]:
        s = self.settings
        requeued: list[str] = []
        for job_id in jobs.active_ids():
            try:
                job = jobs.get(job_id)
            except NotFound:
                jobs.clear_active(job_id)
                continue
            if job.state.terminal:
                jobs.clear_active(job_id)
                continue
            now = utcnow()
            seen = job.updated_at or job.created_at
            age = (now - seen).total_seconds()
            if job.state is JobState.queued and age > s.job_queued_requeue_seconds:
                action, requeue = "requeue-queued", lifecycle.requeue_queued
            elif job.state is JobState.running and age > s.job_stale_seconds:
                action, requeue = "requeue-lost", lifecycle.requeue_lost
            else:
                continue
            try:
                if requeue(jobs, job_id, seen) is None:
                    continue  # someone touched it since we looked: not lost
            except (PreconditionFailed, NotFound):
                continue
            try:
                self.queue.enqueue(job_id, tenant)
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
