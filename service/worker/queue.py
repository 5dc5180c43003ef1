"""``JobQueue``: what the API and the reconciler need from the broker (ids only)."""

from __future__ import annotations

import logging

from celery import Celery

from service.config import Settings
from service.errors import Unavailable
from service.worker.celery_app import RUN_JOB_TASK, WEBHOOK_TASK

log = logging.getLogger(__name__)


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
