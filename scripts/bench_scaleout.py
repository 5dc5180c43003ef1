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
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_output import machine_header, tee_to  # noqa: E402

from service.demo import build_demo_model  # noqa: E402
from service.devstack import LocalStack, free_port  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def tally(workers: int, jobs: int, finished: dict[str, tuple[str, float]],
          seconds: float) -> dict[str, Any]:
    """One configuration's row from ``finished`` (job id -> (terminal state, seconds from the
    burst's start)). Throughput counts succeeded jobs only: a job that failed or was cancelled
    did no useful work, however quickly it ended; those, and jobs still unfinished at the
    time cap, are counted beside it."""
    states = [state for state, _ in finished.values()]
    succeeded = [at for state, at in finished.values() if state == "succeeded"]
    return {
        "workers": workers, "jobs": jobs, "succeeded": len(succeeded),
        "failed": states.count("failed"), "cancelled": states.count("cancelled"),
        "unfinished": jobs - len(finished), "seconds": seconds,
        "jobs_per_min": 60 * len(succeeded) / seconds if seconds > 0 else 0.0,
        "median_finish_s": statistics.median(succeeded) if succeeded else float("nan"),
    }


def run(workers: int, jobs: int, timeout: float) -> dict[str, Any]:
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
            resp = http.post(f"{state.api_url}/v1/models", data=path.read_bytes(),
                             headers={"Content-Type": "application/octet-stream"}, timeout=60)
            resp.raise_for_status()
            model = resp.json()
            time.sleep(2)  # let the extra workers connect
            start = time.monotonic()
            ids = []
            for _ in range(jobs):
                resp = http.post(f"{state.api_url}/v1/jobs", json={
                    "model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}, timeout=30)
                resp.raise_for_status()  # a refused submission is not a job to wait for
                ids.append(resp.json()["id"])
            finished: dict[str, tuple[str, float]] = {}
            pending = set(ids)
            while pending and time.monotonic() - start < timeout:
                for job_id in list(pending):
                    job = http.get(f"{state.api_url}/v1/jobs/{job_id}", timeout=30).json()
                    if job["state"] in TERMINAL:
                        pending.discard(job_id)
                        finished[job_id] = (job["state"], time.monotonic() - start)
                time.sleep(0.2)
            return tally(workers, jobs, finished, time.monotonic() - start)
        finally:
            stack.stop_started()


def report(rows: list[dict[str, Any]]) -> int:
    """Print the table; 1 when any job did not succeed (the figure would not be one of
    working jobs), else 0."""
    print(f"{'workers':>7} {'jobs':>5} {'succeeded':>9} {'failed':>6} {'cancelled':>9} "
          f"{'unfinished':>10} {'seconds':>8} {'jobs/min':>9} {'median finish s':>16}")
    for r in rows:
        print(f"{r['workers']:>7} {r['jobs']:>5} {r['succeeded']:>9} {r['failed']:>6} "
              f"{r['cancelled']:>9} {r['unfinished']:>10} {r['seconds']:>8.1f} "
              f"{r['jobs_per_min']:>9.1f} {r['median_finish_s']:>16.1f}")
    print("(jobs/min counts succeeded jobs only)")
    base = rows[0]["jobs_per_min"]
    for r in rows[1:]:
        ratio = f"{r['jobs_per_min'] / base:.2f}x" if base > 0 else "n/a (no job succeeded)"
        print(f"speed-up {r['workers']} vs {rows[0]['workers']} workers: {ratio}")
    bad = [r for r in rows if r["succeeded"] != r["jobs"]]
    if bad:
        print(f"FAILED: {sum(r['jobs'] - r['succeeded'] for r in bad)} job(s) did not succeed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table here, after a header naming the machine "
                             "(docs/bench/scaleout.txt is the committed one)")
    args = parser.parse_args(argv)
    header = machine_header(
        "scripts/bench_scaleout.py", sys.argv[1:] if argv is None else argv,
        threads=f"worker processes {' vs '.join(map(str, args.workers))}, each Celery "
        "concurrency 1, prefetch 1; one API, one Redis, one SeaweedFS on the same machine")
    with tee_to(args.out, header):
        return report([run(w, args.jobs, args.timeout) for w in args.workers])


if __name__ == "__main__":
    sys.exit(main())
