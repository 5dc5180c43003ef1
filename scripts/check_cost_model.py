"""Print the cost model's latency prediction error over the test corpus on this host.

For every corpus model (tests/corpus.py) and a few variants built by the engine's own passes
(float after normalisation, dynamic int8, static int8 QDQ, fp16, int4 weight-only; a variant a
pass refuses is left out), it measures ONNX Runtime latency on this CPU (one thread, batch 1,
all variants of one model interleaved, medians) and compares it with the cost model:

- ``raw``: the uncalibrated roofline estimate on the ``host`` profile;
- ``fit``: after ``calibrate_host`` on all samples (in-sample);
- ``loo``: leave-one-model-out (calibrated on the other models: the honest number).

    .venv/bin/python scripts/check_cost_model.py [--models digits_cnn lstm_model] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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


def measure(paths: dict[str, Path], feed: dict) -> dict[str, float]:
    from service.engine.evaluate import make_session, measure_latency

    sessions = {k: make_session(p, 1) for k, p in paths.items()}
    result = measure_latency(sessions, feed, runs=15, warmup=3)
    return {k: v["median_ms"] for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(corpus.BUILDERS))
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgepress_corpus")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from service.engine import cost_model
    from service.engine.devices import host_profile

    host = host_profile()
    samples: list[tuple[str, str, Path, float, dict]] = []
    with tempfile.TemporaryDirectory(prefix="check_cost_model_") as tmp:
        for name in args.models:
            model = corpus.BUILDERS[name](args.cache_dir)
            paths = build_variants(model, Path(tmp) / name)
            feed = {k: v[:1] for k, v in model.inputs.items()}
            shapes = {k: list(v.shape) for k, v in feed.items()}
            for variant, ms in measure(paths, feed).items():
                samples.append((name, variant, paths[variant], ms, shapes))
        rows = []
        loaded = [(n, v, cost_model.analyse(__import__("onnx").load(str(p)), s), ms)
                  for n, v, p, ms, s in samples]
        fit = cost_model.calibrate_host(
            [(c, ms, f"{n}:{v}") for n, v, c, ms in loaded], host)
        for (name, variant, cost, ms), point in zip(loaded, fit.points, strict=True):
            raw = cost_model.estimate(None, host, cost=cost).latency_ms  # type: ignore[arg-type]
            others = [(c, m, f"{n}:{v}") for n, v, c, m in loaded if n != name]
            loo = None
            if len(others) >= 2:
                cal = cost_model.calibrate_host(others, host)
                loo = cost_model.estimate(None, host, cost=cost, calibration=cal).latency_ms  # type: ignore[arg-type]
            rows.append({"model": name, "variant": variant, "measured_ms": ms, "raw_ms": raw,
                         "fit_ms": point["predicted_ms"], "loo_ms": loo})

    def err(pred: float | None, meas: float) -> float | None:
        return None if pred is None else 100.0 * (pred - meas) / meas

    print(f"host: {host.title}; calibration scale {fit.compute_scale}, "
          f"overhead {fit.node_overhead_us} us/node\n")
    print(f"{'model':<22}{'variant':<18}{'measured':>10}{'raw':>9}{'err%':>7}"
          f"{'fit':>9}{'err%':>7}{'loo':>9}{'err%':>7}")
    for r in rows:
        e_raw, e_fit, e_loo = (err(r["raw_ms"], r["measured_ms"]), err(r["fit_ms"], r["measured_ms"]),
                               err(r["loo_ms"], r["measured_ms"]))
        loo = f"{r['loo_ms']:9.3f}{e_loo:7.0f}" if r["loo_ms"] is not None else f"{'-':>9}{'-':>7}"
        print(f"{r['model']:<22}{r['variant']:<18}{r['measured_ms']:10.3f}{r['raw_ms']:9.3f}"
              f"{e_raw:7.0f}{r['fit_ms']:9.3f}{e_fit:7.0f}{loo}")
    for key in ("raw_ms", "fit_ms", "loo_ms"):
        errs = [abs(err(r[key], r["measured_ms"]) or 0) for r in rows if r[key] is not None]
        if errs:
            print(f"median |error| {key[:-3]:<4}: {statistics.median(errs):5.1f} %  "
                  f"(max {max(errs):.0f} %, {len(errs)} samples)")
    if args.json:
        args.json.write_text(json.dumps({"host": host.name, "calibration": fit.to_dict(),
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
