"""A real Prometheus scrapes the live stack, and every series the dashboard uses exists.

Prometheus (Debian's ``prometheus`` package, installed by ``scripts/validate_deploy.sh
prometheus`` when missing) runs on a free loopback port with a 1 s scrape interval, scraping
the live stack's API ``/metrics`` and the worker's metrics endpoint, as the ServiceMonitor and
PodMonitor of k8s/base/monitors.yaml do in a cluster. One real job runs through the stack so
that the job, stage and compression series exist; then the test asks Prometheus' HTTP API:

- both targets are up;
- every metric the Grafana dashboard (k8s/monitoring/edgepress-dashboard.json) queries has
  series, with the labels the dashboard groups by;
- every dashboard query, with Grafana's variables filled in, evaluates without error, and the
  instant ones (queue depth, workers, jobs in progress) return data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.devstack import StackState, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "monitoring" / "edgepress-dashboard.json"

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _http_json(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback only
        return json.load(resp)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = _http_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return [
        (panel["title"], target["expr"])
        for panel in walk(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


@pytest.fixture(scope="module")
def prometheus(live_stack: StackState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server scraping the live stack every second; yields its base URL."""
    install = subprocess.run(  # noqa: S603 - fixed script
        ["bash", str(ROOT / "scripts" / "validate_deploy.sh"), "prometheus"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not on PATH after installing Debian's package"

    directory = tmp_path_factory.mktemp("prometheus")
    api = urllib.parse.urlsplit(live_stack.api_url)
    worker = urllib.parse.urlsplit(live_stack.worker_metrics_url)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "edgepress-api",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [api.netloc]}],
            },
            {
                "job_name": "edgepress-worker",
                "metrics_path": worker.path,
                "static_configs": [{"targets": [worker.netloc]}],
            },
        ],
    }
    # JSON is valid YAML, and Prometheus reads its configuration as YAML.
    (directory / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (directory / "prometheus.log").read_text()[-3000:]
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)

    try:
        _wait_for(ready, 30, "Prometheus to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def finished_job(live_stack: StackState, mlp_model: Path) -> dict[str, Any]:
    """One real job run to completion, so that job, stage and compression series exist."""
    api = live_stack.api_url
    model = _http_json(
        f"{api}/v1/models?filename=mlp.onnx",
        data=mlp_model.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    job = _http_json(
        f"{api}/v1/jobs",
        data=json.dumps(
            {"model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    deadline = time.monotonic() + 180
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job['id']} still {job['state']}"
        time.sleep(0.5)
        job = _http_json(f"{api}/v1/jobs/{job['id']}")
    assert job["state"] == "succeeded", job
    # A request that fails on the client's side, so 4xx series exist as well.
    with pytest.raises(urllib.error.HTTPError):
        _http_json(f"{api}/v1/jobs/job_does_not_exist")
    return job


def test_prometheus_scrapes_every_series_the_dashboard_uses(
    prometheus: str, finished_job: dict[str, Any]
) -> None:
    # Both targets up, and a scrape taken after the job finished.
    _wait_for(lambda: len(_query(prometheus, "up == 1")) == 2, 30, "both targets up")
    _wait_for(
        lambda: bool(_query(prometheus, 'edgepress_jobs_finished_total{state="succeeded"} > 0')),
        30,
        "the finished job to be scraped",
    )

    # The series, with the labels the dashboard groups or filters by.
    expected_labels = {
        "edgepress_http_requests_total": {"route", "method", "status"},
        "edgepress_http_request_duration_seconds_bucket": {"route", "method", "le"},
        "edgepress_jobs_submitted_total": set(),
        "edgepress_jobs_finished_total": {"state"},
        "edgepress_job_duration_seconds_bucket": {"state", "le"},
        "edgepress_job_stage_seconds_bucket": {"stage", "le"},
        "edgepress_compression_ratio_bucket": {"le"},
        "edgepress_compression_ratio_sum": set(),
        "edgepress_compression_ratio_count": set(),
        "edgepress_queue_depth": set(),
        "edgepress_worker_jobs_in_progress": set(),
        "edgepress_worker_busy_seconds_total": set(),
    }
    used_by_dashboard = set()
    for _, expr in _dashboard_queries():
        used_by_dashboard |= set(re.findall(r"\bedgepress_[a-z_]+", expr))
    assert used_by_dashboard <= set(expected_labels), used_by_dashboard - set(expected_labels)
    for name in sorted(used_by_dashboard):
        result = _query(prometheus, name)
        assert result, f"no series for {name}"
        labels = set().union(*(set(r["metric"]) for r in result))
        assert expected_labels[name] <= labels, (name, labels)

    statuses = {r["metric"]["status"] for r in _query(prometheus, "edgepress_http_requests_total")}
    assert any(s.startswith("2") for s in statuses) and "404" in statuses, statuses
    assert {r["metric"]["state"] for r in _query(prometheus, "edgepress_jobs_finished_total")} >= {
        "succeeded"
    }
    # The API process defines the metric too (one ServiceMetrics class), at 0: read the worker's.
    busy = _query(prometheus, 'edgepress_worker_busy_seconds_total{job="edgepress-worker"}')
    assert busy and float(busy[0]["value"][1]) > 0, busy

    # Every dashboard query evaluates; the instant ones have data.
    instant = ("Jobs waiting in the queue", "Workers up", "Queue depth and running jobs")
    for title, expr in _dashboard_queries():
        filled = (
            expr.replace("$__rate_interval", "30s")
            .replace("$__range", "5m")
            .replace("$namespace", ".*")
        )
        result = _query(prometheus, filled)
        if title in instant:
            assert result, (title, filled)
