#!/usr/bin/env python3
"""Compress the bundled demo model through the HTTP API and print what happened."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.demo import build_demo_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api", default="http://127.0.0.1:8080")
    parser.add_argument("--recipe", default="quantize_dynamic", help="pass name for the demo job")
    args = parser.parse_args()
    http = requests.Session()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_model(Path(tmp) / "demo_mlp.onnx")
        with open(path, "rb") as fh:
            resp = http.post(
                f"{args.api}/v1/models",
                params={"filename": path.name},
                data=fh,
                headers={"Content-Type": "application/octet-stream"},
                timeout=60,
            )
    resp.raise_for_status()
    model = resp.json()
    print(
        f"model    {model['id']}  {model['bytes']} bytes, {model['parameter_count']} parameters, opset {model['opset']}"
    )
    resp = http.post(
        f"{args.api}/v1/jobs",
        json={
            "model_id": model["id"],
            "device": "host",
            "recipe": [{"pass": args.recipe}],
        },
        timeout=30,
    )
    if resp.status_code != 202:
        print(resp.text, file=sys.stderr)
        return 1
    job_url = args.api + resp.headers["Location"]
    job = resp.json()
    print(f"job      {job['id']}  {job_url}")
    last = None
    deadline = time.monotonic() + 600
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            print("timed out waiting for the job", file=sys.stderr)
            return 1
        time.sleep(0.5)
        job = http.get(job_url, timeout=30).json()
        line = f"         {job['state']:<10} {job['stage']:<24} {job['progress'] * 100:5.1f}%"
        if line != last:
            print(line)
            last = line
    if job["state"] != "succeeded":
        print(f"job {job['state']}: {job.get('error')}", file=sys.stderr)
        return 1
    r = job["result"]
    print(
        f"size     {r['bytes_before']} -> {r['bytes_after']} bytes ({r['size_ratio']:.2f}x smaller)"
    )
    if r.get("speedup"):
        print(
            f"latency  {r['latency_ms_before']:.3f} -> {r['latency_ms_after']:.3f} ms on this host ({r['speedup']:.2f}x)"
        )
    print(f"fidelity min cosine {r['min_cosine']:.5f} on {r['eval_inputs']} inputs")
    for name in job["artifacts"]:
        print(
            f"artifact {args.api}/v1/jobs/{job['id']}/artifacts/{name}  (302 to a presigned S3 URL)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
