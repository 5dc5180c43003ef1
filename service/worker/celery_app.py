"""The Celery app, built from the same ``Settings`` as the API (Flask's Celery pattern).

Delivery rules (DESIGN.md): late acknowledgement, prefetch 1, a message lost with its worker is
handed back (``task_reject_on_worker_lost``). The broker carries job ids only; the job record
in the object store is the truth, and a reconciler in every worker re-enqueues records that
are queued too long or whose worker stopped heart-beating, so losing the broker loses no job.
"""

from __future__ import annotations

from celery import Celery

from service.config import Settings

RUN_JOB_TASK = "edgepress.run_job"
WEBHOOK_TASK = "edgepress.deliver_webhook"


def create_celery_app(settings: Settings) -> Celery:
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
        task_soft_time_limit=settings.job_time_limit + 120,
        task_time_limit=settings.job_time_limit + 180,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than any job: a message is redelivered by the broker only as a last
            # resort; the reconciler is what retries jobs of dead workers promptly.
            "visibility_timeout": settings.job_time_limit + 600,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.edgepress_settings = settings
    return app
