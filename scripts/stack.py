#!/usr/bin/env python3
"""Local stack control: ``python scripts/stack.py up|down|status [--dir .stack]``.

``up`` starts SeaweedFS, Redis (unless one is given or listening), the API (gunicorn, :8080)
and one Celery worker (metrics on :9808), and waits until they answer. ``down`` stops exactly
what ``up`` started. Settings come from ``EDGEPRESS_*`` like everywhere else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.devstack import LocalStack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".stack", help="state, logs and local data")
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--worker-metrics-port", type=int, default=9808)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (concurrency)")
    args = parser.parse_args(argv)
    stack = LocalStack(
        Path(args.dir), api_port=args.api_port, worker_metrics_port=args.worker_metrics_port,
        worker_concurrency=args.workers,
    )
    if args.command == "up":
        if stack.status().get("running"):
            print(f"stack already running (state in {stack.state_file})")
            return 0
        state = stack.up()
        print(f"API            {state.api_url}")
        print(f"worker metrics {state.worker_metrics_url}")
        print(f"S3             {state.s3_endpoint} bucket={state.bucket}")
        print(f"broker         {state.broker_url}")
        print(f"logs           {Path(state.dir)}/*.log   stop: python scripts/stack.py down")
    elif args.command == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(stack.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
