"""Benchmark the engine's techniques on the test corpus, next to the plain ONNX Runtime call.

For every corpus model (tests/corpus.py) and every technique, runs the engine's
``run_pipeline`` (ingest, normalise, the pass, evaluate) and prints size ratio, latency ratio
(speedup at batch 1, fixed threads, original and compressed interleaved, medians), the lowest
fidelity cosine over all outputs and the accuracy delta (digits CNN), beside the same numbers
for the plain one-call ``onnxruntime.quantization.quantize_dynamic(input, output)`` on the same
input file (or its error).

    .venv/bin/python scripts/bench_engine.py                      # everything
    .venv/bin/python scripts/bench_engine.py --models digits_cnn --techniques quantize_static
    .venv/bin/python scripts/bench_engine.py --json bench.json    # machine-readable rows

Adding a row: put a recipe in ``TECHNIQUES`` (a list of steps, or ``"auto"``); a technique that
only applies to some models can say so in ``APPLIES_TO``. Issue 3's bars are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests import corpus  # noqa: E402

# name -> recipe given to run_pipeline (a list of steps, or "auto").
TECHNIQUES: dict[str, list[dict[str, Any]] | str] = {
    "quantize_dynamic": [{"pass": "quantize_dynamic"}],
    "quantize_static": [{"pass": "quantize_static"}],
    "fp16": [{"pass": "fp16"}],
    "int4_weight_only": [{"pass": "int4_weight_only"}],
    "graph_optimize": [{"pass": "graph_optimize", "level": "extended"}],
}
# technique -> models it is meant for (absent = all models).
APPLIES_TO: dict[str, set[str]] = {}

# Issue 3's bars: (model, technique, what, check).
BARS = [
    (
        "transformer_encoder",
        "quantize_dynamic",
        "int8 >= 3.7x smaller",
        lambda r: r.size_ratio >= 3.7,
    ),
    ("lstm_model", "quantize_dynamic", "int8 >= 3.7x smaller", lambda r: r.size_ratio >= 3.7),
    ("gru_model", "quantize_dynamic", "int8 >= 3.7x smaller", lambda r: r.size_ratio >= 3.7),
    ("digits_cnn", "quantize_static", "int8 >= 3.7x smaller", lambda r: r.size_ratio >= 3.7),
    ("transformer_encoder", "int4_weight_only", "int4 >= 6x smaller", lambda r: r.size_ratio >= 6),
    ("digits_cnn", "quantize_static", "static int8 faster than float", lambda r: r.speedup > 1.0),
    ("digits_cnn", "quantize_static", "static int8 >= 1.5x (aim)", lambda r: r.speedup >= 1.5),
    (
        "digits_cnn",
        "quantize_static",
        "accuracy within 0.5 points",
        lambda r: r.accuracy_delta is not None and r.accuracy_delta >= -0.005,
    ),
    (
        "*",
        "*",
        "fidelity cosine >= 0.99",
        lambda r: r.min_cosine is not None and r.min_cosine >= 0.99,
    ),
]


@dataclass
class Row:
    """One measured result; ``error`` is set (and the numbers None) when it failed."""

    model: str
    technique: str
    size_ratio: float | None = None
    speedup: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    min_cosine: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_delta: float | None = None
    seconds: float | None = None
    error: str | None = None


def _dataset(model: corpus.CorpusModel, workdir: Path) -> Path:
    """The model's evaluation inputs (and labels) as a dataset .npz for run_pipeline."""
    path = workdir / f"{model.name}_dataset.npz"
    arrays = dict(model.inputs)
    if model.labels is not None:
        arrays["labels"] = model.labels
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _limits(model: corpus.CorpusModel) -> Any:
    from service.engine.limits import EngineLimits

    samples = len(next(iter(model.inputs.values())))
    return EngineLimits(eval_samples=samples, latency_runs=21, latency_threads=1)


def _row_from_summary(model: str, technique: str, summary: dict, seconds: float) -> Row:
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    return Row(
        model=model,
        technique=technique,
        size_ratio=summary["size_ratio"],
        speedup=summary["speedup"],
        latency_ms_before=summary["latency_ms_before"],
        latency_ms_after=summary["latency_ms_after"],
        min_cosine=summary["min_cosine"],
        accuracy_before=before,
        accuracy_after=after,
        accuracy_delta=None if before is None or after is None else after - before,
        seconds=round(seconds, 1),
    )


def bench_engine(
    model: corpus.CorpusModel, technique: str, recipe: list[dict] | str, workdir: Path
) -> Row:
    """One technique through ``run_pipeline``."""
    from service.engine.errors import EngineError
    from service.engine.pipeline import run_pipeline

    started = time.perf_counter()
    try:
        result = run_pipeline(
            model.path,
            recipe,  # type: ignore[arg-type]
            workdir / f"{model.name}_{technique}",
            dataset_path=_dataset(model, workdir),
            limits=_limits(model),
        )
    except EngineError as exc:
        return Row(model.name, technique, error=f"{exc.code}: {exc.message[:160]}")
    except Exception as exc:  # a bug: show it, keep benchmarking the other rows
        traceback.print_exc()
        return Row(model.name, technique, error=f"{type(exc).__name__}: {str(exc)[:160]}")
    return _row_from_summary(model.name, technique, result.summary, time.perf_counter() - started)


# Issue 4: auto mode per model, on this host. The digits CNN gets the accuracy constraint of
# the bar; the others the default fidelity floor (cosine >= 0.99).
AUTO_CONSTRAINTS: dict[str, dict[str, Any]] = {"digits_cnn": {"max_accuracy_drop": 0.005}}
AUTO_BARS = [
    ("digits_cnn", "auto", "auto >= 3.5x smaller", lambda r: r.size_ratio >= 3.5),
    ("digits_cnn", "auto", "auto >= 1.5x faster", lambda r: r.speedup >= 1.5),
    ("*", "auto", "auto never slower than float", lambda r: r.speedup >= 1.0),
]
BARS.extend(AUTO_BARS)


def bench_auto(model: corpus.CorpusModel, workdir: Path) -> Row:
    """``recipe: "auto"`` for the host, with the model's constraints (``AUTO_CONSTRAINTS``)."""
    from service.engine.errors import EngineError
    from service.engine.pipeline import run_pipeline

    started = time.perf_counter()
    try:
        result = run_pipeline(
            model.path,
            "auto",
            workdir / f"{model.name}_auto",
            dataset_path=_dataset(model, workdir),
            device=None,
            constraints=AUTO_CONSTRAINTS.get(model.name, {}),
            limits=_limits(model),
        )
    except EngineError as exc:
        return Row(model.name, "auto", error=f"{exc.code}: {exc.message[:160]}")
    print(f"  auto on {model.name}: chose {result.report['auto']['chosen']['candidate']}")
    return _row_from_summary(model.name, "auto", result.summary, time.perf_counter() - started)


def bench_plain_ort(model: corpus.CorpusModel, workdir: Path) -> Row:
    """The plain one-call ``quantize_dynamic(input, output)``, evaluated like the engine's."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from service.engine.evaluate import dataset_feeds, evaluate_candidate

    started = time.perf_counter()
    out = workdir / f"{model.name}_plain_ort.onnx"
    try:
        quantize_dynamic(str(model.path), str(out))
        original = onnx.load(str(model.path))
        limits = _limits(model)
        feeds, labels = dataset_feeds(
            original, dict(model.inputs), model.labels, limits.eval_samples
        )
        ev = evaluate_candidate(model.path, out, feeds, labels=labels, limits=limits)
    except Exception as exc:  # the plain call's failure is a result here
        return Row(
            model.name,
            "plain ORT quantize_dynamic",
            error=f"{type(exc).__name__}: {str(exc)[:160]}",
        )
    acc = ev["accuracy"]
    summary = {
        "size_ratio": ev["size"]["ratio"],
        "speedup": ev["latency"]["speedup"],
        "latency_ms_before": ev["latency"]["before_ms"],
        "latency_ms_after": ev["latency"]["after_ms"],
        "min_cosine": ev["min_cosine"],
        "accuracy_before": acc["before"] if acc else None,
        "accuracy_after": acc["after"] if acc else None,
    }
    return _row_from_summary(
        model.name, "plain ORT quantize_dynamic", summary, time.perf_counter() - started
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: Row) -> str:
    if row.error:
        return f"{'ERROR ' + row.error:<62.62}"
    delta = None if row.accuracy_delta is None else row.accuracy_delta * 100
    return (
        f"{_fmt(row.size_ratio, '6.2f')}x {_fmt(row.speedup, '5.2f')}x "
        f"{_fmt(row.latency_ms_before, '7.3f')}>{_fmt(row.latency_ms_after, '7.3f')}ms "
        f"{_fmt(row.min_cosine, '7.5f')} {_fmt(delta, '+5.2f'):>6}pt"
    )


def print_table(model: corpus.CorpusModel, rows: list[Row], plain: Row) -> None:
    info = model.info
    extra = f", float test accuracy {info['test_accuracy']:.4f}" if "test_accuracy" in info else ""
    print(
        f"\n== {model.name}: {model.path.stat().st_size / 1e6:.2f} MB, "
        f"exporter {info.get('exporter', '?')}{extra}"
    )
    head = "   size speedup  float>compressed     cosine  acc.d"
    print(f"{'technique':<18} | {'EdgePress':<62} | plain ORT quantize_dynamic (same file)")
    print(f"{'':<18} | {head:<62} | {head}")
    for row in rows:
        print(f"{row.technique:<18} | {_cells(row):<62} | {_cells(plain)}")


def check_bars(rows: list[Row]) -> list[tuple[str, str, str, bool | None]]:
    results: list[tuple[str, str, str, bool | None]] = []
    for model, technique, what, check in BARS:
        for row in rows:
            if row.technique == "plain ORT quantize_dynamic":
                continue
            if (model in ("*", row.model)) and (technique in ("*", row.technique)):
                if row.error:
                    if model != "*":
                        results.append((row.model, row.technique, what, None))
                    continue
                results.append((row.model, row.technique, what, bool(check(row))))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(corpus.BUILDERS))
    parser.add_argument("--techniques", nargs="*", default=list(TECHNIQUES))
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgepress_corpus"
    )
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    parser.add_argument(
        "--no-auto", dest="auto", action="store_false", help="leave out the auto row (issue 4)"
    )
    args = parser.parse_args(argv)

    all_rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        workdir = Path(tmp)
        for name in args.models:
            model = corpus.BUILDERS[name](args.cache_dir)
            rows = [
                bench_engine(model, t, TECHNIQUES[t], workdir)
                for t in args.techniques
                if name in APPLIES_TO.get(t, {name})
            ]
            if args.auto:
                rows.append(bench_auto(model, workdir))
            plain = bench_plain_ort(model, workdir)
            print_table(model, rows, plain)
            all_rows.extend(rows + [plain])

    print("\n== bars (issue 3)")
    failed = 0
    for model_name, technique, what, ok in check_bars(all_rows):
        mark = "n/a (error)" if ok is None else ("PASS" if ok else "FAIL")
        failed += ok is False
        print(f"  {mark:<11} {model_name:<20} {technique:<18} {what}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in all_rows], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
