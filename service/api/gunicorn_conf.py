"""gunicorn settings for the API (kept in the repo; values from EDGEPRESS_* where relevant).

Prometheus multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set to an empty directory before
any metric is created; the local stack script and the k8s manifests set it (emptyDir). The
child_exit hook tells prometheus_client that a worker's live gauges are gone.
"""

import os

bind = os.environ.get("EDGEPRESS_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("EDGEPRESS_API_WORKERS", "2"))
# Long-polled status requests hold a thread each (at most EDGEPRESS_LONG_POLL_MAX_WAITERS).
threads = int(os.environ.get("EDGEPRESS_API_THREADS", "8"))
worker_class = "gthread"
timeout = 120
graceful_timeout = 30
keepalive = 5
# Uploads stream to disk; keep request line/header limits at their safe defaults.
limit_request_line = 8190
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("EDGEPRESS_LOG_LEVEL", "info").lower()


def on_starting(server):  # type: ignore[no-untyped-def]
    # A restarted container can find the previous process's files in its emptyDir: stale
    # samples would distort gauges and counters. Start from an empty directory.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
