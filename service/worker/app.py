"""The worker's Celery app: tasks registered, metrics served, reconciler started."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from celery import Celery, signals

from service.config import Settings


def create_worker_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    # prometheus_client picks multiprocess mode from this variable when the first metric is
    # made; pool processes must share one directory with the main process that serves /metrics.
    if not settings.prometheus_multiproc_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="edgepress-worker-metrics-"
        )
    else:  # a restarted container may find the previous process's samples: start empty
        for stale in Path(settings.prometheus_multiproc_dir).glob("*.db"):
            stale.unlink(missing_ok=True)

    from service.metrics import ServiceMetrics
    from service.queue import JobQueue, create_celery_app
    from service.storage.s3 import make_store
    from service.worker.tasks import Reconciler, register_tasks

    logging.basicConfig(level=settings.log_level.upper())
    app = create_celery_app(settings)
    metrics = ServiceMetrics()
    register_tasks(app, settings, metrics)

    @signals.worker_ready.connect(weak=False)
    def _on_ready(sender=None, **_: object) -> None:  # type: ignore[no-untyped-def]
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        from service.worker.isolation import protect_worker

        protect_worker()  # the engines (same uid in the pods) cannot read our environment

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(
            settings.worker_metrics_port, settings.worker_metrics_host, registry=registry
        )
        Reconciler(settings, make_store(settings), JobQueue(app, settings)).start()

    @signals.worker_process_init.connect(weak=False)
    def _on_child_start(**_: object) -> None:
        # The engine forkserver imports ONNX, ONNX Runtime and the engine (~1 s): start it
        # with the pool process, not on its first job.
        from service.worker.engine_host import start_engine_server
        from service.worker.isolation import protect_worker

        protect_worker()
        try:
            start_engine_server(settings.engine_huge_pages)
        except Exception:  # noqa: BLE001 - the first job starts it again and reports any error
            logging.getLogger(__name__).exception("could not start the engine server")

    @signals.worker_process_shutdown.connect(weak=False)
    def _on_child_exit(pid=None, **_: object) -> None:  # type: ignore[no-untyped-def]
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())

    return app
