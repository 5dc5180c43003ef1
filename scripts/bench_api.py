#!/usr/bin/env python3
"""API benchmark on loopback: bounded load, upload memory, service overhead vs the engine.

    .venv/bin/python scripts/bench_api.py [--requests 400] [--concurrency 4] [--upload-gib 1]

1. **Load**: a fixed number of ``GET /v1/jobs/{id}`` (status polls) and ``GET /v1/jobs``
   (listing, 20 per page) from ``--concurrency`` threads, each phase capped at ``--time-cap``
   seconds: requests/s, p50, p99, errors.
2. **Upload memory**: the API's resident memory (gunicorn master + workers, from /proc) sampled
   every 20 ms, and each process's kernel high-water mark, while a ``--upload-gib`` GiB body is
   streamed to ``POST /v1/models`` (with a Content-Length, then chunked); the bytes are
   generated on the fly (nothing that size exists on disk or in memory here). The upload is
   refused at the end as not ONNX, which is expected: the point is memory during the stream.
   After the last byte the API inspects the file in a child process (parsing an ONNX protobuf
   needs it whole): that peak is reported separately (``rss_peak_after_stream_mb``).
3. **Overhead**: the same model, recipe and device (``host``) through the service (upload,
   submit, wait, download: what a pipeline step does with ``EdgePressClient`` and its default
   ``wait``) vs ``compress`` called directly in this process (imports and ONNX Runtime
   warm: the best case) and in a fresh process (``python -c`` calling the engine: what a
   script pays), on MLPs of ``--overhead-hidden`` widths (17 MB and 68 MB by default). Rounds
   are interleaved, each in another order, and medians reported; ``service_first_s`` is the
   first service run, which uploads the model (later runs find it by its hash and skip the
   upload, as a pipeline re-submitting a model does). Target: within 10 %.

By default it starts its own stack (own ports, own queue, own key prefix, upload limit raised
to fit the big upload) and stops it at the end; ``--api URL`` measures a running one instead
(the upload memory part then needs the API's pids, so it is skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_output import machine_header, tee_to  # noqa: E402

from service.client import EdgePressClient, EdgePressError  # noqa: E402
from service.config import Settings  # noqa: E402
from service.devstack import LocalStack, free_port  # noqa: E402

GIB = 1024**3
# Both paths do the same work: a job's device defaults to the worker's own host profile, and
# with a device the engine also estimates the model on it.
DEVICE = "host"


# ---------------------------------------------------------------------------------------------
# 1. Load


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load_phase(name: str, url: str, count: int, concurrency: int, cap_s: float) -> dict:
    """``count`` GETs of ``url`` from ``concurrency`` threads (one keep-alive session each),
    stopping early at ``cap_s`` seconds."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    issued = iter(range(count))
    deadline = time.monotonic() + cap_s

    def worker() -> None:
        nonlocal errors
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                if next(issued, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                ok = session.get(url, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                errors += 0 if ok else 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - started
    return {"phase": name, "requests": len(latencies), "errors": errors,
            "seconds": round(wall, 2), "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(_percentile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2)}


# ---------------------------------------------------------------------------------------------
# 2. Upload memory


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren ...: gunicorn workers and the upload-inspection processes."""
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB: resident now, and its resident high-water mark
    (the kernel's own peak, so a short spike between two samples is not missed)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _rss_mb(pids: list[int]) -> float:
    return sum(_memory_kb(p)[0] for p in pids) / 1024.0


class _GeneratedBody:
    """``size`` bytes made on the fly from one random 1 MiB block (rotated so that no two
    chunks are equal). ``sized``: it can tell its length (seek to the end and back), so the
    client sends a Content-Length; otherwise it is a pipe and goes out chunked."""

    def __init__(self, size: int, sized: bool) -> None:
        self.size = self.left = size
        self.sized = sized
        self.block = os.urandom(1024 * 1024)
        self.turn = 0
        self.sent_at: float | None = None

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self.sized:
            raise OSError("not seekable")
        if whence == 2:
            return self.size + offset
        if offset != 0:
            raise OSError("only rewinding is supported")
        self.left, self.turn = self.size, 0
        return 0

    def tell(self) -> int:
        return self.size - self.left

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = min(self.left, len(self.block) if n is None or n < 0 else n)
        self.turn = (self.turn + 7919) % len(self.block)
        chunk = (self.block[self.turn:] + self.block[:self.turn])[:n]
        self.left -= len(chunk)
        if self.left <= 0:
            self.sent_at = time.monotonic()  # the last byte left the client
        return chunk

    def seekable(self) -> bool:
        return self.sized


def upload_memory(api_url: str, api_pid: int, size: int, sized: bool) -> dict:
    # gunicorn answers /readyz as soon as one worker is up: wait for all of them, and re-list
    # them at every sample (a worker that is replaced must still be counted).
    workers = Settings().api_workers
    deadline = time.monotonic() + 60
    while len(_children(api_pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # let the last worker finish importing the app
    pids = [api_pid, *_children(api_pid)]
    baseline = _rss_mb(pids)
    hwm_before = {p: _memory_kb(p)[1] for p in pids}
    samples: list[tuple[float, float, dict[int, int]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            current = [api_pid, *_descendants(api_pid)]
            mem = {p: _memory_kb(p) for p in current}
            samples.append((time.monotonic(), sum(m[0] for m in mem.values()) / 1024.0,
                            {p: m[1] for p, m in mem.items()}))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    client = EdgePressClient(api_url, max_retries=0, timeout=600)
    started = time.perf_counter()
    outcome, detail = "accepted", ""
    body = _GeneratedBody(size, sized)
    try:
        client.upload_model(body, filename="big.onnx",  # type: ignore[arg-type]
                            presigned=False)  # through the API: its memory is the point
    except EdgePressError as exc:
        outcome = f"{exc.status} {exc.code}"
        detail = exc.detail[:80]
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    hwm_after = {p: _memory_kb(p)[1] for p in pids}
    # While the body streams the API should stay flat; after the last byte it inspects the
    # file (parsing an ONNX protobuf needs the whole file in memory: that is the engine's).
    # Growth is per process (one worker serves the upload), from the kernel's high-water mark.
    cut = body.sent_at or time.monotonic()
    at_cut = [h for t, _, h in samples if t <= cut]
    hwm_cut = at_cut[-1] if at_cut else hwm_before
    stream_growth = max(hwm_cut.get(p, 0) - hwm_before.get(p, 0) for p in pids) / 1024.0
    total_growth = max(hwm_after.get(p, 0) - hwm_before.get(p, 0) for p in pids) / 1024.0
    during = max([r for t, r, _ in samples if t <= cut] or [baseline])
    after = max([r for t, r, _ in samples if t > cut] or [during])
    return {"transfer": "Content-Length" if sized else "chunked", "bytes": size,
            "seconds": round(seconds, 2),
            "throughput_mib_s": round(size / 1024**2 / seconds, 1), "outcome": outcome,
            "api_processes": len(pids), "rss_baseline_mb": round(baseline, 1),
            "rss_peak_stream_mb": round(during, 1),
            "hwm_growth_stream_mb": round(stream_growth, 1),
            "hwm_growth_total_mb": round(total_growth, 1),
            "rss_peak_after_stream_mb": round(after, 1),
            "samples": len(samples), "detail": detail}


# ---------------------------------------------------------------------------------------------
# 3. Overhead vs the engine


def overhead(api_url: str, model: Path, recipe: Any, rounds: int, poll: float) -> dict:
    """The three paths on one model, interleaved round by round (each round in another order)
    so that load drifting on a shared host weighs on all of them alike; medians."""
    from service.engine.compress import compress

    direct_parts: list[dict[str, float]] = []

    def direct() -> None:
        marks: list[tuple[str, float]] = []

        def progress(stage: str, fraction: float) -> None:
            stage = ":".join(stage.split(":")[:2])  # "pass:<name>", not its sub-steps
            if not marks or marks[-1][0] != stage:
                marks.append((stage, time.perf_counter()))

        with tempfile.TemporaryDirectory(prefix="bench-direct-") as tmp:
            compress(model, recipe, Path(tmp), device=DEVICE, progress=progress)
        marks.append(("end", time.perf_counter()))
        stages: dict[str, float] = {}
        for (stage, t0), (_, t1) in zip(marks, marks[1:], strict=False):
            stages[f"engine.{stage}"] = stages.get(f"engine.{stage}", 0.0) + t1 - t0
        direct_parts.append(stages)

    code = (
        "import sys, tempfile; from pathlib import Path; "
        "from service.engine.compress import compress; "
        f"compress(Path({str(model)!r}), {recipe!r}, Path(tempfile.mkdtemp()), "
        f"device={DEVICE!r})"
    )
    root = str(Path(__file__).resolve().parent.parent)

    def fresh() -> None:
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True)

    client = EdgePressClient(api_url, timeout=120)
    parts: list[dict[str, float]] = []
    worker_parts: list[dict[str, float]] = []

    def service() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-svc-") as tmp:
            t0 = time.perf_counter()
            record = client.upload_model(model)
            t1 = time.perf_counter()
            job = client.submit_job(record.id, recipe=recipe, device=DEVICE)
            job = client.wait(job.id, poll=poll, timeout=600)
            t2 = time.perf_counter()
            if job.state.value != "succeeded":
                raise RuntimeError(f"benchmark job {job.id} {job.state.value}: {job.error}")
            client.download_artifact(job.id, "model.onnx", Path(tmp), job=job)
            t3 = time.perf_counter()
            if job.started_at is None or job.finished_at is None:
                raise RuntimeError(f"benchmark job {job.id} has no start/finish times")
            queued = (job.started_at - job.created_at).total_seconds()
            ran = (job.finished_at - job.started_at).total_seconds()
            parts.append({"upload": t1 - t0, "submit_to_start": queued, "worker_run": ran,
                          "observed_after": (t2 - t1) - queued - ran, "download": t3 - t2})
            worker_parts.append(dict((job.result or {}).get("timings_s") or {}))

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    direct()  # warm the imports and ORT once, as a worker's steady state would be
    first_upload = timed(service)  # the model is new here: uploaded, not found by its hash
    paths = {"direct": direct, "fresh": fresh, "service": service}
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for r in range(rounds):
        for name in order[r % 3:] + order[:r % 3]:
            times[name].append(timed(paths[name]))
    d, f, sv = (statistics.median(times[k]) for k in ("direct", "fresh", "service"))
    return {
        "model_bytes": model.stat().st_size, "recipe": recipe, "rounds": rounds, "poll_s": poll,
        "direct_s": round(d, 2), "fresh_process_s": round(f, 2), "service_s": round(sv, 2),
        "service_first_s": round(first_upload, 2),
        "overhead_vs_direct_pct": round(100 * (sv - d) / d, 1),
        "overhead_vs_fresh_process_pct": round(100 * (sv - f) / f, 1),
        "service_parts_median_s": {k: round(statistics.median(p[k] for p in parts[1:]), 3)
                                   for k in parts[0]},
        "worker_timings_median_s": {
            k: round(statistics.median(p.get(k, 0.0) for p in worker_parts[1:]), 3)
            for k in worker_parts[-1]},
        "direct_stages_median_s": {
            k: round(statistics.median(p.get(k, 0.0) for p in direct_parts[1:]), 3)
            for k in direct_parts[-1]},
        "all": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


# ---------------------------------------------------------------------------------------------


def _print_table(title: str, rows: list[dict], keys: list[str]) -> None:
    print(f"\n{title}")
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


@contextlib.contextmanager
def _stack(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """The API URL (and its gunicorn master pid) to measure: ours, started here, or --api."""
    if args.api:
        yield args.api, None
        return
    tag = uuid.uuid4().hex[:8]
    stack = LocalStack(
        Path(tempfile.mkdtemp(prefix="edgepress-bench-")), api_port=free_port(),
        worker_metrics_port=free_port(), prefix=f"bench-{tag}",
        extra_env={"EDGEPRESS_QUEUE_NAME": f"edgepress.bench.{tag}",
                   # The big upload must not hit the limit before memory is measured.
                   "EDGEPRESS_MAX_UPLOAD_BYTES": str(int(args.upload_gib * GIB) + GIB)})
    state = stack.up()
    try:
        yield state.api_url, state.pids["api"]
    finally:
        stack.stop_started()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", help="measure this running API instead of starting a stack")
    parser.add_argument("--requests", type=int, default=400, help="requests per load phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per load phase")
    parser.add_argument("--upload-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="overhead rounds per path")
    parser.add_argument("--model-inputs", type=int, default=1024, help="MLP input width")
    parser.add_argument("--model-hidden", type=int, default=4096,
                        help="MLP hidden width (the weights dominate: 4 x inputs x hidden bytes)")
    parser.add_argument("--overhead-hidden", type=lambda v: [int(x) for x in v.split(",")],
                        default=[4096, 16384],
                        help="MLP hidden widths of the overhead models (4096: 17 MB, 16384: "
                             "68 MB)")
    parser.add_argument("--overhead-recipe", default='[{"pass": "quantize_dynamic"}]',
                        help='recipe of the overhead jobs: JSON steps, or "auto"')
    parser.add_argument("--poll", type=float, default=1.0,
                        help="the client's poll interval in wait() (its default: 1.0)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["load", "upload", "overhead"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed tables here, after a header naming the "
                             "machine (docs/bench/api.txt is the committed one)")
    args = parser.parse_args()
    api_workers, api_threads = Settings().api_workers, Settings().api_threads  # gunicorn's
    header = machine_header(
        "scripts/bench_api.py", sys.argv[1:],
        threads=f"{args.concurrency} client threads; API gunicorn workers {api_workers}, "
        f"threads {api_threads}; one Celery worker (concurrency 1); engine defaults"
        + (f"; measured API {args.api}" if args.api else "; own stack on this machine"))
    with tee_to(args.out, header):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The phases not skipped; 1 when a load request failed, else 0 (a failing job or upload
    raises)."""
    from tests.models import write_mlp

    results: dict[str, Any] = {"host_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="edgepress-bench-") as tmp, \
            _stack(args) as (api_url, api_pid):
        model = write_mlp(Path(tmp) / "bench_mlp.onnx", inputs=args.model_inputs,
                          hidden=args.model_hidden)
        recipe: Any = (args.overhead_recipe if args.overhead_recipe == "auto"
                       else json.loads(args.overhead_recipe))
        client = EdgePressClient(api_url)
        if "load" not in args.skip:
            record = client.upload_model(model)
            job = client.wait(client.submit_job(record.id, recipe=recipe).id, poll=0.2,
                              timeout=600)
            rows = [load_phase("status poll  GET /v1/jobs/{id}", f"{api_url}/v1/jobs/{job.id}",
                               args.requests, args.concurrency, args.time_cap),
                    load_phase("listing      GET /v1/jobs?limit=20",
                               f"{api_url}/v1/jobs?limit=20", args.requests,
                               args.concurrency, args.time_cap)]
            results["load"] = rows
            _print_table(f"Load ({args.concurrency} threads, keep-alive, loopback)", rows,
                         ["phase", "requests", "errors", "seconds", "rps", "p50_ms", "p99_ms"])
        if "upload" not in args.skip:
            if api_pid is None:
                print("\nUpload memory: skipped (needs the API's pid: run without --api)")
            else:
                rows = [upload_memory(api_url, api_pid, int(args.upload_gib * GIB), sized)
                        for sized in (True, False)]
                results["upload"] = rows
                _print_table(f"API memory while streaming a {args.upload_gib:g} GiB upload",
                             rows, ["transfer", "bytes", "seconds", "throughput_mib_s",
                                    "outcome", "rss_baseline_mb", "rss_peak_stream_mb",
                                    "hwm_growth_stream_mb", "hwm_growth_total_mb",
                                    "rss_peak_after_stream_mb"])
        if "overhead" not in args.skip:
            rows = []
            for hidden in args.overhead_hidden:
                sized = model if hidden == args.model_hidden else write_mlp(
                    Path(tmp) / f"bench_mlp_{hidden}.onnx", inputs=args.model_inputs,
                    hidden=hidden)
                rows.append(overhead(api_url, sized, recipe, args.rounds, args.poll))
            results["overhead"] = rows
            _print_table("Service vs engine (same model, recipe and device; medians of "
                         "interleaved rounds)", rows,
                         ["model_bytes", "rounds", "poll_s", "direct_s", "fresh_process_s",
                          "service_s", "service_first_s", "overhead_vs_direct_pct",
                          "overhead_vs_fresh_process_pct"])
            for row in rows:
                print(f"  {row['model_bytes']} bytes:")
                print(f"    service time by part: {json.dumps(row['service_parts_median_s'])}")
                print(f"    worker timings: {json.dumps(row['worker_timings_median_s'])}")
                print(f"    direct call stages: {json.dumps(row['direct_stages_median_s'])}")
                print(f"    all runs: {json.dumps(row['all'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    errors = sum(row["errors"] for row in results.get("load", []))
    if errors:
        print(f"\nFAILED: {errors} load request(s) did not answer 200")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
