"""Datasets: ``.npz`` files of calibration / evaluation samples, keyed by model input name.

Layout: one array per model input, axis 0 is the model's batch axis and counts samples; an
optional ``labels`` array holds one integer class per sample. Arrays with one more axis than the
model input whose axis 1 is 1 (``[samples, 1, ...]`` for a batch-1 model) are accepted and
squeezed. Loading never unpickles (``allow_pickle=False``; object arrays are refused).

This module imports only numpy and onnx (the API calls ``inspect_dataset`` on upload).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from service.engine.errors import EngineError
from service.engine.ingest import graph_inputs
from service.engine.limits import EngineLimits

LABELS = "labels"


def _open(path: Path, limits: EngineLimits) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise EngineError("invalid_dataset", "the dataset could not be read") from None
    if size > limits.max_dataset_bytes:
        raise EngineError("invalid_dataset", "the dataset is larger than the limit",
                          {"bytes": size, "limit": limits.max_dataset_bytes})
    # An .npz is a zip: check the expanded size before numpy inflates it (zip-bomb guard).
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        raise EngineError("invalid_dataset", "the dataset must be a NumPy .npz file "
                          "(np.savez / np.savez_compressed)") from None
    if not infos:
        raise EngineError("invalid_dataset", "the dataset is empty")
    if len(infos) > limits.max_archive_members:
        raise EngineError("invalid_dataset", "the dataset has too many arrays",
                          {"arrays": len(infos), "limit": limits.max_archive_members})
    total = sum(i.file_size for i in infos)
    if total > limits.max_dataset_bytes or (
        size and total / size > limits.max_compression_ratio
    ):
        raise EngineError("invalid_dataset", "the dataset expands beyond the size limit",
                          {"bytes": total, "limit": limits.max_dataset_bytes})
    for info in infos:
        if not info.filename.endswith(".npy") or "/" in info.filename:
            raise EngineError("invalid_dataset", "the dataset must hold only .npy arrays "
                              "(np.savez)", {"member": info.filename[:200]})
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except ValueError as exc:
        msg = "object arrays are not accepted (they need pickle)" if "pickle" in str(exc) \
            else "an array cannot be read"
        raise EngineError("invalid_dataset", f"the dataset is not valid: {msg}") from None
    except (OSError, zipfile.BadZipFile, EOFError):
        raise EngineError("invalid_dataset", "the dataset is corrupt") from None
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise EngineError("invalid_dataset", f"array {key!r} has dtype {arr.dtype}; only "
                              "numeric and boolean arrays are accepted")
        if arr.ndim == 0:
            raise EngineError("invalid_dataset", f"array {key!r} is a scalar; axis 0 must "
                              "count samples")
    return arrays


def _samples(arrays: dict[str, np.ndarray]) -> int:
    counts = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise EngineError("invalid_dataset", "all arrays must have the same number of samples "
                          "(axis 0)", {"samples": counts})
    n = next(iter(counts.values()))
    if n == 0:
        raise EngineError("invalid_dataset", "the dataset has no samples")
    return n


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise EngineError("invalid_dataset", "'labels' must be a 1-D integer array, one class "
                          "index per sample")
    if labels.dtype.kind == "i" and (labels < 0).any():
        raise EngineError("invalid_dataset", "'labels' must be non-negative class indices")
    return labels.astype(np.int64)


def inspect_dataset(path: Path, limits: EngineLimits | None = None) -> dict:
    """Validate a dataset on its own and describe it.

    Returns ``{arrays: {name: {shape, dtype}}, samples, has_labels}``; raises
    ``EngineError('invalid_dataset')``.
    """
    limits = limits or EngineLimits()
    arrays = _open(path, limits)
    samples = _samples(arrays)
    if LABELS in arrays:
        _check_labels(arrays[LABELS])
    for key, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise EngineError("invalid_dataset", f"array {key!r} contains NaN or infinite values")
    return {
        "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in arrays.items()},
        "samples": samples,
        "has_labels": LABELS in arrays,
    }


def load_dataset(
    path: Path, model: onnx.ModelProto, limits: EngineLimits | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Load a dataset and validate it against the model's inputs.

    Returns ``(inputs, labels)``: ``inputs`` maps every model input name to an array whose
    shape matches the input (axis 0 = samples along the batch axis) and whose dtype is the
    input's (float64 data is cast to float32 etc. when the kinds agree); ``labels`` is int64 or
    None. Raises ``EngineError('invalid_dataset')`` naming the array and the mismatch.
    """
    limits = limits or EngineLimits()
    arrays = _open(path, limits)
    _samples(arrays)
    labels = _check_labels(arrays.pop(LABELS)) if LABELS in arrays else None
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise EngineError("invalid_dataset", "dataset arrays must be named after the model "
                          f"inputs {names} (plus optional 'labels')",
                          {"missing": missing, "unexpected": extra})
    out: dict[str, np.ndarray] = {}
    for v in inputs:
        arr = arrays[v.name]
        tt = v.type.tensor_type
        want = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if arr.dtype != want:
            same_kind = (arr.dtype.kind == want.kind) or (
                arr.dtype.kind in "iu" and want.kind in "iu")
            if not same_kind:
                raise EngineError("invalid_dataset", f"array {v.name!r} has dtype {arr.dtype}, "
                                  f"the model input needs {want}")
            cast = arr.astype(want)
            if arr.dtype.kind in "iu" and not np.array_equal(cast, arr):
                raise EngineError("invalid_dataset", f"array {v.name!r} has values that do "
                                  f"not fit {want}")
            arr = cast
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise EngineError("invalid_dataset", f"array {v.name!r} contains NaN or infinite "
                              "values")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        if dims is not None:
            if arr.ndim == len(dims) + 1 and arr.shape[1] == 1 and dims and dims[0] in (1, None):
                arr = arr[:, 0]
            if arr.ndim != len(dims):
                raise EngineError("invalid_dataset", f"array {v.name!r} has shape "
                                  f"{list(arr.shape)}, the model input has rank {len(dims)} "
                                  f"({_fmt(dims)}); axis 0 counts samples",
                                  {"input": v.name, "shape": list(arr.shape)})
            for axis, d in enumerate(dims):
                if axis == 0 and d == 1:
                    continue  # samples are fed one at a time along the batch axis
                if d is not None and arr.shape[axis] != d and not (axis == 0 and
                                                                    arr.shape[0] % d == 0):
                    raise EngineError("invalid_dataset", f"array {v.name!r} has shape "
                                      f"{list(arr.shape)}, the model input is {_fmt(dims)}",
                                      {"input": v.name, "axis": axis})
        out[v.name] = np.ascontiguousarray(arr)
    return out, labels


def _fmt(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
