"""Prometheus metrics, safe under gunicorn's and Celery's pre-forked processes.

Multiprocess mode is prometheus_client's own switch: when ``PROMETHEUS_MULTIPROC_DIR`` is set
(gunicorn_conf.py and the worker entry point set it to a fresh directory) every process writes
its samples to files there and ``render()`` aggregates them. Without it (tests with the Flask
test client) the metrics live in this process's registry.

Metric names are a contract with the Grafana dashboard and the alert rules in k8s/monitoring.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
RATIO_BUCKETS = (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 16, 32)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ServiceMetrics:
    """Every EdgePress metric. One instance per process (the app or the worker holds it)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # In multiprocess mode samples go to files whatever the registry; a private registry
        # keeps repeated construction (tests) from clashing in the global one.
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "edgepress_http_requests_total",
            "HTTP requests served.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "edgepress_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_submitted = Counter(
            "edgepress_jobs_submitted_total", "Jobs accepted by the API.", registry=r
        )
        self.jobs_finished = Counter(
            "edgepress_jobs_finished_total",
            "Jobs that reached a terminal state.",
            ["state"],
            registry=r,
        )
        self.job_duration = Histogram(
            "edgepress_job_duration_seconds",
            "Job run time from start to terminal state.",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_stage = Histogram(
            "edgepress_job_stage_seconds",
            "Time spent per job stage.",
            ["stage"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.compression_ratio = Histogram(
            "edgepress_compression_ratio",
            "Original bytes / compressed bytes of succeeded jobs.",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.worker_in_progress = Gauge(
            "edgepress_worker_jobs_in_progress",
            "Jobs running in this worker.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_busy = Counter(
            "edgepress_worker_busy_seconds_total",
            "Seconds this worker spent running jobs.",
            registry=r,
        )
        self.webhooks = Counter(
            "edgepress_webhook_deliveries_total",
            "Webhook delivery attempts by outcome.",
            ["outcome"],
            registry=r,
        )
        self.uploads_bytes = Counter(
            "edgepress_upload_bytes_total", "Bytes received in uploads.", ["kind"], registry=r
        )

    def render(self, extra: list[Collector] | None = None) -> tuple[bytes, str]:
        """The exposition text: aggregated over processes in multiprocess mode."""
        if multiprocess_enabled():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        for collector in extra or []:
            registry.register(collector)
        try:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        finally:
            if registry is self.registry:
                for collector in extra or []:
                    registry.unregister(collector)


class QueueDepthCollector(Collector):
    """``edgepress_queue_depth``, read from the broker at scrape time (never stale, and correct
    whichever process serves the scrape)."""

    def __init__(self, read_depth: Callable[[], int | None]) -> None:
        self._read_depth = read_depth

    def collect(self):  # type: ignore[no-untyped-def]
        depth = self._read_depth()
        family = GaugeMetricFamily("edgepress_queue_depth", "Jobs waiting in the broker queue.")
        if depth is not None:
            family.add_metric([], float(depth))
        yield family
