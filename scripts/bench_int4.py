"""Benchmark int4 weight-only methods (rtn, hqq, gptq, awq) against float32.

On a classifier trained for the purpose (``tests.models.digits_mlp``: scikit-learn digits at
16x16, MLP 256 -> H -> H -> 10 with softmax, H = ``--hidden``), runs the ``int4_weight_only``
pass for every method and block size (gptq/awq calibrate on the training rows), and prints per
row: size ratio (float bytes / int4 bytes), KL divergence of the softmax outputs and top-1
agreement vs float32 on the held-out test rows (disjoint from calibration), and latency ratio
(int4 / float32; below 1 = faster) at batch 1 with 1 intra-op thread and with the host's usable
cores, float32 and every int4 model interleaved, medians. ``accuracy_level`` is the pass's
choice for this host (printed). The digits MLP is small enough for per-node overhead to show in
its latency, so a second table times a random-weight 1024-4096-1024 MLP (32 MB of float
weights) the same way. The bar: every calibration-aware method has a lower KLD than
RTN at the same block size; the script exits 1 when it fails or a row errors.

    .venv/bin/python scripts/bench_int4.py --out docs/bench/int4.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_output import machine_header, tee_to  # noqa: E402

METHODS = ("rtn", "hqq", "gptq", "awq")
BLOCKS = (32, 128)
RUNS = 41


def _session(model: object, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,  # type: ignore[attr-defined]
                                providers=["CPUExecutionProvider"])


def kld(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-10) - np.log(q + 1e-10)), axis=1)))


def latency_ratios(models: dict[str, object], feed: dict[str, np.ndarray], threads: int,
                   runs: int) -> dict[str, float]:
    """Median latency of each model / the float one's, all interleaved run by run."""
    sessions = {name: _session(m, threads) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feed)
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["fp32"]))
    return {name: float(np.median(t)) / base for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table here after the machine header")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    header = machine_header(
        "scripts/bench_int4.py", sys.argv[1:] if argv is None else argv,
        threads=f"latency at 1 and {cores} intra-op threads, batch 1, {args.runs} interleaved "
        "runs, medians")
    with tee_to(args.out, header):
        return run(args, cores)


def run(args: argparse.Namespace, cores: int) -> int:
    from service.engine.passes.int4_weight_only import Int4WeightOnly, Int4WeightOnlyConfig
    from service.engine.registry import PassContext
    from tests.models import digits_mlp

    model, x_cal, x_test = digits_mlp(hidden=args.hidden)
    reference = _session(model, cores).run(None, {"x": x_test})[0]
    rows: dict[tuple[str, int], dict] = {}
    models: dict[str, object] = {"fp32": model}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bench_int4_") as tmp:
        for block in BLOCKS:
            for method in METHODS:
                ctx = PassContext(workdir=Path(tmp), dataset={"x": x_cal})
                config = Int4WeightOnlyConfig.model_validate(
                    {"method": method, "block_size": block, "min_elements": 1024,
                     "calibration_samples": 512})
                try:
                    start = time.perf_counter()
                    out = Int4WeightOnly().run(model, config, ctx)
                    seconds = time.perf_counter() - start
                except Exception:
                    traceback.print_exc()
                    failed += 1
                    rows[method, block] = {"error": True}
                    continue
                probs = _session(out, cores).run(None, {"x": x_test})[0]
                models[f"{method}/{block}"] = out
                rows[method, block] = {
                    "size": model.ByteSize() / out.ByteSize(), "kld": kld(reference, probs),
                    "top1": float((probs.argmax(1) == reference.argmax(1)).mean()),
                    "seconds": seconds, "level": ctx.notes["accuracy_level"]}
    feed = {"x": x_test[:1]}
    one = latency_ratios(models, feed, 1, args.runs)
    many = latency_ratios(models, feed, cores, args.runs)

    print(f"digits MLP 256-{args.hidden}-{args.hidden}-10, {len(x_cal)} calibration rows, "
          f"{len(x_test)} held-out rows; float32 {model.ByteSize()} bytes")
    print(f"{'method':<7} {'block':>5} {'size x':>7} {'KLD':>10} {'top-1':>7} "
          f"{'lat 1t':>7} {f'lat {cores}t':>7} {'acc lvl':>7} {'quant s':>8}")
    for (method, block), row in rows.items():
        if "error" in row:
            print(f"{method:<7} {block:>5}  ERROR (traceback above)")
            continue
        key = f"{method}/{block}"
        print(f"{method:<7} {block:>5} {row['size']:>7.2f} {row['kld']:>10.2e} "
              f"{row['top1']:>7.4f} {one[key]:>7.2f} {many[key]:>7.2f} "
              f"{row['level']!s:>7} {row['seconds']:>8.2f}")
    print("\nlatency columns: int4 median / float32 median (below 1 = faster than float32)")
    print("\nbar: every calibration-aware method beats RTN on KLD at the same block size")
    bars = 0
    for block in BLOCKS:
        for method in METHODS[1:]:
            ours, rtn = rows[method, block], rows["rtn", block]
            ok = "error" not in ours and "error" not in rtn and ours["kld"] < rtn["kld"]
            bars += not ok
            detail = ("error" if "error" in ours or "error" in rtn
                      else f"{ours['kld']:.2e} < {rtn['kld']:.2e}")
            print(f"  {'PASS' if ok else 'FAIL'} {method} block {block}: {detail}")
    failed += wide_latency(args, cores)
    code = 1 if failed or bars else 0
    print(f"\n{failed} rows errored, {bars} bars failed; exit {code}")
    return code


def wide_latency(args: argparse.Namespace, cores: int) -> int:
    """Latency where int4 matters (weights too big for the caches): a random-weight MLP
    x[1, 1024] -> 1024x4096 -> 4096x1024, each method calibrated on 64 random rows. Returns
    the number of rows that errored."""
    from service.engine.normalise import normalise
    from service.engine.passes.int4_weight_only import Int4WeightOnly, Int4WeightOnlyConfig
    from service.engine.registry import PassContext
    from tests.models import mlp

    model = normalise(mlp(inputs=1024, hidden=4096, outputs=1024))[0]  # as the pipeline does
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 1024)).astype(np.float32)}
    models: dict[str, object] = {"fp32": model}
    sizes: dict[str, float] = {}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bench_int4_") as tmp:
        for block in BLOCKS:
            for method in METHODS:
                config = Int4WeightOnlyConfig.model_validate(
                    {"method": method, "block_size": block})
                try:
                    out = Int4WeightOnly().run(model, config,
                                               PassContext(workdir=Path(tmp), dataset=data))
                except Exception:
                    traceback.print_exc()
                    failed += 1
                    continue
                models[f"{method}/{block}"] = out
                sizes[f"{method}/{block}"] = model.ByteSize() / out.ByteSize()
    feed = {"x": data["x"][:1]}
    one = latency_ratios(models, feed, 1, args.runs)
    many = latency_ratios(models, feed, cores, args.runs)
    print(f"\nlatency on a random-weight MLP 1024-4096-1024 (float32 {model.ByteSize()} bytes, "
          "batch 1): int4 median / float32 median")
    print(f"{'method':<7} {'block':>5} {'size x':>7} {'lat 1t':>7} {f'lat {cores}t':>7}")
    for key, size in sizes.items():
        method, block = key.split("/")
        print(f"{method:<7} {block:>5} {size:>7.2f} {one[key]:>7.2f} {many[key]:>7.2f}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
