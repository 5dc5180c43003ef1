#!/usr/bin/env python3
"""Throughput of short jobs with 1 vs N worker processes on this machine (one API, one Redis).

Bounded: a fixed burst of jobs per configuration and a time cap. Prints a table. On N nodes
each worker pod is one such process (concurrency 1, prefetch 1): with jobs that are CPU-bound
in the engine, throughput grows with cores/nodes until the object store or the broker
saturates; the queue-depth autoscaler (k8s/) adds pods while jobs wait.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.demo import build_demo_model  # noqa: E402
from service.devstack import LocalStack, free_port  # noqa: E402


def run(workers: int, jobs: int, timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp), api_port=free_port(), worker_metrics_port=free_port(),
                           bucket="edgepress-bench", prefix=f"scale-{uuid.uuid4().hex[:8]}",
                           own_redis=True)
        state = stack.up()
        try:
            for i in range(2, workers + 1):
                stack.start_worker(name=f"worker-{i}")
            http = requests.Session()
            path = build_demo_model(Path(tmp) / "demo.onnx", hidden=512)
            model = http.post(f"{state.api_url}/v1/models", data=path.read_bytes(),
                              headers={"Content-Type": "application/octet-stream"}, timeout=60).json()
            time.sleep(2)  # let the extra workers connect
            start = time.monotonic()
            ids = [http.post(f"{state.api_url}/v1/jobs", json={
                "model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}, timeout=30).json()["id"]
                for _ in range(jobs)]
            durations = []
            pending = set(ids)
            while pending and time.monotonic() - start < timeout:
                for job_id in list(pending):
                    job = http.get(f"{state.api_url}/v1/jobs/{job_id}", timeout=30).json()
                    if job["state"] in ("succeeded", "failed", "cancelled"):
                        pending.discard(job_id)
                        durations.append(time.monotonic() - start)
                time.sleep(0.2)
            elapsed = time.monotonic() - start
            return {"workers": workers, "jobs": jobs, "done": jobs - len(pending),
                    "seconds": elapsed, "jobs_per_min": 60 * (jobs - len(pending)) / elapsed,
                    "median_finish_s": statistics.median(durations) if durations else float("nan")}
        finally:
            stack.stop_started()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    rows = [run(w, args.jobs, args.timeout) for w in args.workers]
    print(f"{'workers':>7} {'jobs':>5} {'done':>5} {'seconds':>8} {'jobs/min':>9} {'median finish s':>16}")
    for r in rows:
        print(f"{r['workers']:>7} {r['jobs']:>5} {r['done']:>5} {r['seconds']:>8.1f} {r['jobs_per_min']:>9.1f} {r['median_finish_s']:>16.1f}")
    base = rows[0]["jobs_per_min"]
    for r in rows[1:]:
        print(f"speed-up {r['workers']} vs {rows[0]['workers']} workers: {r['jobs_per_min'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
