"""gunicorn settings for the API (kept in the repo; values from ``Settings``, so from the
same EDGEPRESS_* variables as everything else: EDGEPRESS_BIND, EDGEPRESS_API_WORKERS,
EDGEPRESS_API_THREADS, EDGEPRESS_API_TIMEOUT ...).

Prometheus multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set to an empty directory before
any metric is created; the local stack script and the k8s manifests set it (emptyDir). The
child_exit hook tells prometheus_client that a worker's live gauges are gone.
"""

import os

from service.config import Settings

_settings = Settings()

bind = _settings.bind
workers = _settings.api_workers
# Long-polled status requests hold a thread each (at most EDGEPRESS_LONG_POLL_MAX_WAITERS).
threads = _settings.api_threads
worker_class = "gthread"
timeout = _settings.api_timeout
graceful_timeout = _settings.api_graceful_timeout
keepalive = _settings.api_keepalive
# Uploads stream to disk; keep request line/header limits at their safe defaults.
limit_request_line = 8190
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()


def on_starting(server):  # type: ignore[no-untyped-def]
    # A restarted container can find the previous process's files in its emptyDir: stale
    # samples would distort gauges and counters. Start from an empty directory.
    directory = _settings.prometheus_multiproc_dir
    if directory and os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    if _settings.prometheus_multiproc_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
