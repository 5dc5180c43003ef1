"""Fit the cost model's CPU constants on this host and print predicted vs measured latency.

For every corpus model (tests/corpus.py) and a few variants built by the engine's own passes
(float after normalisation, dynamic int8, static int8 QDQ, fp16, int4 weight-only; a variant a
pass refuses is left out), it measures ONNX Runtime latency on this CPU (batch 1, at the
host's thread count: its usable cores, how a job on this host runs; all variants of one model
interleaved, medians, the lowest of 3 passes, ``--passes``) and fits ``cost_model.fit_cpu_constants`` (least squares on relative
error: compute and memory efficiency, reference-kernel rate when a sample runs one, per-node
overhead; the cache bandwidth factor keeps its default). It prints per sample:

- ``defaults``: the estimate with the module's default constants, the CPU fallback
  (``scripts/fit_cpu_fallback.py`` fits it over the stored fits: on a machine with no fit yet,
  this column is the fallback's error on a machine it has not seen);
- ``fit``: with the constants fitted on all samples (in-sample);
- ``loo``: leave-one-model-out (fitted on the other models: the honest number).

``--write-fit`` stores the constants with their fit error, the machine and the date in
``service/engine/devices/cost_fit.json``, which the cost model then uses for CPUs with this
host's kernels. The file keeps one fit per kind of machine (architecture and kernel-selecting
ISA features): a run replaces the fit for its own kernels and keeps the others, and
``scripts/fit_cpu_fallback.py`` then refits the fallback for other CPUs over all of them. ``--out``
writes what it prints under ``docs/bench/`` with the machine header (one output per fitted
machine: the record's ``command`` names it).

    .venv/bin/python scripts/check_cost_model.py --write-fit --out docs/bench/cost_model.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_output import machine_header, tee_to  # noqa: E402

from tests import corpus  # noqa: E402

VARIANTS: dict[str, list[dict]] = {
    "int8_dynamic": [{"pass": "quantize_dynamic"}],
    "int8_static": [{"pass": "quantize_static"}],
    "fp16": [{"pass": "fp16"}],
    "int4_weight_only": [{"pass": "int4_weight_only"}],
}


def build_variants(model: corpus.CorpusModel, workdir: Path) -> dict[str, Path]:
    """The normalised float model and every variant the engine's passes produce."""
    import onnx

    from service.engine.ingest import load_model
    from service.engine.normalise import normalise
    from service.engine.registry import PassContext, parse_recipe

    workdir.mkdir(parents=True, exist_ok=True)
    ingested = load_model(model.path, workdir / "in")
    base, _ = normalise(ingested.model)
    out = {"float": workdir / "float.onnx"}
    onnx.save_model(base, str(out["float"]))
    for name, recipe in VARIANTS.items():
        current = base
        try:
            for index, (cls, config) in enumerate(parse_recipe(recipe)):
                step = workdir / f"{name}_{index}"
                step.mkdir(parents=True, exist_ok=True)
                current = cls().run(current, config, PassContext(
                    workdir=step, dataset=model.calibration, original=base))
        except Exception as exc:  # a pass that refuses this model: no such variant
            print(f"  ({model.name}: {name} skipped: {type(exc).__name__}: {str(exc)[:80]})")
            continue
        out[name] = workdir / f"{name}.onnx"
        onnx.save_model(current, str(out[name]))
    return out


PASSES = 3  # measurement passes per model (--passes); the least disturbed (lowest median) counts


def measure(paths: dict[str, Path], feed: dict, threads: int,
            passes_count: int = PASSES) -> dict[str, tuple[float, float]]:
    """(median ms, spread) per variant, interleaved, the lowest of ``passes_count`` passes: on
    a shared host other processes only ever add time, so the least disturbed pass is the
    closest; the spread (slowest / fastest pass) says how disturbed the host was."""
    from service.engine.evaluate import make_session, measure_latency

    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    passes = [measure_latency(sessions, feed, runs=15, warmup=3) for _ in range(passes_count)]
    out = {}
    for k in sessions:
        medians = [r[k]["median_ms"] for r in passes]
        out[k] = (min(medians), max(medians) / min(medians))
    return out


def profile_at(host, threads: int):  # type: ignore[no-untyped-def]
    """The host's profile for ``threads`` of its cores: peaks and bandwidth scaled to them
    (what the fit divides measured time by)."""
    cores = host.cores or 1
    if threads >= cores:
        return host
    share = threads / cores
    return host.model_copy(update={
        "cores": threads, "peak_gops": {k: v * share for k, v in host.peak_gops.items()},
        "memory_bandwidth_gbps": host.memory_bandwidth_gbps * share})


def _err(pred: float | None, meas: float) -> float | None:
    return None if pred is None else 100.0 * (pred - meas) / meas


def _stats(errors: list[float]) -> tuple[float, float]:
    absolute = [abs(e) for e in errors]
    return round(statistics.median(absolute), 1), round(max(absolute), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(corpus.BUILDERS))
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgepress_corpus")
    parser.add_argument("--write-fit", action="store_true",
                        help="store the fitted constants in service/engine/devices/cost_fit.json")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: the host's usable cores, as jobs run)")
    parser.add_argument("--passes", type=int, default=PASSES,
                        help="interleaved measurement passes per model, each a median of 15 runs; "
                             "the lowest counts (more passes on a busy shared host)")
    args = parser.parse_args(argv)

    from service.engine import cost_model
    from service.engine.devices import host_profile
    from service.engine.devices.features import kernel_features
    from service.engine.evaluate import latency_thread_counts
    from service.engine.limits import EngineLimits

    threads = args.threads or latency_thread_counts(EngineLimits(), None)[-1]
    host = profile_at(host_profile(), threads)
    header = machine_header("scripts/check_cost_model.py", argv if argv is not None
                            else sys.argv[1:], f"ONNX Runtime intra-op {threads} of "
                            f"{host_profile().cores} usable cores, inter-op 1, sequential")
    with tee_to(args.out, header):
        return _run(args, cost_model, host, threads, kernel_features)


def _run(args, cost_model, host, threads, kernel_features) -> int:  # type: ignore[no-untyped-def]
    import onnx

    from service.engine.devices import host_profile

    samples: list[tuple[str, str, object, float]] = []
    spreads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="check_cost_model_") as tmp:
        for name in args.models:
            model = corpus.BUILDERS[name](args.cache_dir)
            paths = build_variants(model, Path(tmp) / name)
            feed = {k: v[:1] for k, v in model.inputs.items()}
            shapes = {k: list(v.shape) for k, v in feed.items()}
            for variant, (ms, spread) in measure(paths, feed, threads, args.passes).items():
                cost = cost_model.analyse(onnx.load(str(paths[variant])), shapes)
                samples.append((name, variant, cost, ms))
                spreads.append(spread)
    fit_rows = [(c, ms, f"{n}:{v}") for n, v, c, ms in samples]
    constants, points = cost_model.fit_cpu_constants(fit_rows, host)
    defaults = cost_model.Constants.defaults("cpu")
    # leave-one-model-out: one fit per model on the other models (it needs two of them)
    models = {s[0] for s in samples}
    held_out = {name: cost_model.fit_cpu_constants(
        [r for r, s in zip(fit_rows, samples, strict=True) if s[0] != name], host)[0]
        for name in models if len(models - {name}) >= 2}
    rows = []
    for (name, variant, cost, ms), point in zip(samples, points, strict=True):
        default_ms = cost_model.latency_s(cost, host, defaults) * 1e3
        loo = (cost_model.latency_s(cost, host, held_out[name]) * 1e3
               if name in held_out else None)
        rows.append({"model": name, "variant": variant, "measured_ms": round(ms, 4),
                     "pass_spread": round(spreads[len(rows)], 3),
                     "defaults_ms": round(default_ms, 4), "fit_ms": point["predicted_ms"],
                     "loo_ms": None if loo is None else round(loo, 4)})

    print(f"host: {host.title}; {len(rows)} measurements at {threads} thread(s)\n")
    print(f"{'model':<22}{'variant':<18}{'measured':>10}{'spread':>8}{'defaults':>10}{'err%':>7}"
          f"{'fit':>9}{'err%':>7}{'loo':>9}{'err%':>7}")
    for r in rows:
        e_def, e_fit = _err(r["defaults_ms"], r["measured_ms"]), _err(r["fit_ms"], r["measured_ms"])
        loo = (f"{r['loo_ms']:9.3f}{_err(r['loo_ms'], r['measured_ms']):7.0f}"
               if r["loo_ms"] is not None else f"{'-':>9}{'-':>7}")
        print(f"{r['model']:<22}{r['variant']:<18}{r['measured_ms']:10.3f}"
              f"{r['pass_spread']:8.2f}{r['defaults_ms']:10.3f}{e_def:7.0f}{r['fit_ms']:9.3f}{e_fit:7.0f}{loo}")
    error: dict[str, object] = {"samples": len(rows), "models": sorted({r["model"] for r in rows}),
                                "median_pass_spread": round(statistics.median(spreads), 3)}
    print(f"(spread: slowest / fastest of {args.passes} passes; median {statistics.median(spreads):.2f})")
    for key in ("defaults", "fit", "loo"):
        errs = [e for r in rows if (e := _err(r[f"{key}_ms"], r["measured_ms"])) is not None]
        if errs:
            med, worst = _stats(errs)
            prefix = "" if key == "fit" else f"{key}_"  # the fit's own error: no prefix
            error[f"{prefix}median_abs_pct"], error[f"{prefix}max_abs_pct"] = med, worst
            print(f"median |error| {key:<8}: {med:5.1f} %  (max {worst:.0f} %, {len(errs)} samples)")
    fitted = {"compute_efficiency": constants.compute_efficiency,
              "memory_efficiency": constants.memory_efficiency,
              "cache_bandwidth_factor": constants.cache_bandwidth_factor,
              "node_overhead_s": constants.node_overhead_s,
              "reference_kernel_rate": constants.reference_kernel_rate}
    # Only what some sample depends on is fitted (fit_cpu_constants keeps the rest's default).
    reference_ops = sorted({t.reference_op for _, _, c, _ in samples
                            for t in cost_model._terms(c, host)[0] if t.reference_op})
    error["fitted"] = ["compute_efficiency", "memory_efficiency", "node_overhead_s"] + [
        f"reference_kernel_rate.{op}" for op in reference_ops]
    if not reference_ops:
        print("reference_kernel_rate kept at its default: no sample runs a reference kernel")
    print("\nfitted CPU constants: " + ", ".join(f"{k} {v}" for k, v in fitted.items()))
    if args.write_fit:
        record = {
            "command": " ".join(["scripts/check_cost_model.py", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpu": host.title, "architecture": host.architecture,
                        "kernel_features": sorted(kernel_features(host.architecture,
                                                                  host.isa_features)),
                        "cores": host_profile().cores, "threads": threads,
                        "profile": machine_profile(host, threads, host_profile().cores)},
            "constants": fitted, "error": error, "rows": rows,
        }
        path = ROOT / "service" / "engine" / "devices" / "cost_fit.json"
        path.write_text(json.dumps({"fits": merge_fits(_read_fits(path), record)}, indent=2)
                        + "\n")
        print(f"wrote {path.relative_to(ROOT)}; the CPU fallback is fitted over every stored fit: "
              "refit it (scripts/fit_cpu_fallback.py --write, then its printed values into "
              "service/engine/cost_model.py; the tests fail until the two agree)")
    return 0


def machine_profile(host, threads: int, cores: int | None) -> dict:  # type: ignore[no-untyped-def]
    """What the fit divided measured time by (the host profile at the fit's threads: peaks,
    bandwidth and where they came from), so that the record's rows can be estimated again
    with other constants (scripts/fit_cpu_fallback.py) without the machine."""
    return {"peak_gops": {k: round(v, 2) for k, v in host.peak_gops.items()},
            "memory_bandwidth_gbps": round(host.memory_bandwidth_gbps, 2),
            "source": f"{host.sources.get('peak_gops.fp32', '')}; peaks and bandwidth scaled to "
                      f"{threads} of {cores} cores (profile_at)"}


def _read_fits(path: Path) -> list[dict]:
    """The fits already stored at ``path`` (read as the cost model reads them)."""
    from service.engine.cost_model import fit_records

    try:
        return list(fit_records(json.loads(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError):
        return []


def merge_fits(stored: list[dict], record: dict) -> list[dict]:
    """``stored`` with ``record`` in place of any fit for the same kernels (architecture and
    kernel-selecting features): one fit per kind of machine, the newest."""
    def kernels(r: dict) -> tuple:
        m = r["machine"]
        return m.get("architecture"), tuple(sorted(m.get("kernel_features") or ()))

    return [r for r in stored if kernels(r) != kernels(record)] + [record]


if __name__ == "__main__":
    sys.exit(main())
