"""The job queue: the one Celery app, built from ``Settings``, and ``JobQueue``, what the API
and the reconciler send through it (ids only). The worker registers its tasks on the same app
(``service.worker.app``); the API only sends.

Delivery rules (DESIGN.md): late acknowledgement, prefetch 1, a message lost with its worker is
handed back (``task_reject_on_worker_lost``). The broker carries job ids only; the job record
in the object store is the truth, and a reconciler in every worker re-enqueues records that
are queued too long or whose worker stopped heart-beating, so losing the broker loses no job.
"""

from __future__ import annotations

import logging

from celery import Celery

from service.config import Settings, limits_for
from service.errors import Unavailable

log = logging.getLogger(__name__)

RUN_JOB_TASK = "edgepress.run_job"
WEBHOOK_TASK = "edgepress.deliver_webhook"


def create_celery_app(settings: Settings) -> Celery:
    limits = limits_for(settings)
    app = Celery("edgepress", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_routes={
            RUN_JOB_TASK: {"queue": settings.queue_name},
            WEBHOOK_TASK: {"queue": settings.queue_name},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # The engine enforces the job's own limits in its child process; these are the
        # backstop for the task body itself (download, upload, bookkeeping).
        task_soft_time_limit=limits.task_soft_seconds,
        task_time_limit=limits.task_hard_seconds,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than any job: a message is redelivered by the broker only as a last
            # resort; the reconciler is what retries jobs of dead workers promptly.
            "visibility_timeout": limits.redelivery_seconds,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.edgepress_settings = settings
    return app


class JobQueue:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._queue = settings.queue_name

    def enqueue(self, job_id: str, tenant: str) -> None:
        """Send "run job X of tenant T". Raises ``Unavailable`` if the broker cannot take it."""
        try:
            self._app.send_task(
                RUN_JOB_TASK,
                args=[job_id, tenant],
                queue=self._queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu raises many transport-specific types
            log.warning("broker error on enqueue: %s", exc)
            raise Unavailable(
                "the job broker is unavailable; retry later", code="broker_unavailable"
            ) from exc

    def enqueue_webhook(self, job_id: str, tenant: str, attempt: int = 1, countdown: float = 0) -> None:
        """Send "deliver the terminal-state webhook of job X" (retried by the task itself)."""
        try:
            self._app.send_task(
                WEBHOOK_TASK, args=[job_id, tenant, attempt], queue=self._queue,
                countdown=countdown or None,
            )
        except Exception as exc:
            log.warning("broker error on webhook enqueue for %s: %s", job_id, exc)

    def depth(self) -> int | None:
        """Messages waiting in the queue, or None if the broker cannot be asked."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                ok = conn.default_channel.queue_declare(queue=self._queue, passive=True)
                return int(ok.message_count)
        except Exception as exc:
            # A queue never declared yet has no messages; anything else is unknown.
            if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
                return 0
            log.info("queue depth unavailable: %s", exc)
            return None

    def ping(self) -> None:
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as exc:
            raise Unavailable("the job broker is unavailable", code="broker_unavailable") from exc
