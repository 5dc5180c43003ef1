"""Datasets: ``.npz`` files of calibration / evaluation samples, keyed by model input name.

Layout: one array per model input, in either form:

- ``[N, *input_shape]``: N samples, each exactly what the model takes in one run (its declared
  shape, dynamic dims free), wherever its batch axis is: a recurrent state ``[layers, batch,
  hidden]`` is given as ``[N, layers, 1, hidden]``, a scalar input (a sample rate) as ``[N]``;
- ``[rows, ...]`` with the model input's own rank: axis 0 is the model's batch axis (axis 0) and
  counts samples; a model with a fixed batch B takes them B rows at a time.

An optional ``labels`` array holds one integer class per sample. A causal decoder's dataset
(``service.engine.decoder``) may hold only token sequences ``input_ids`` [N, L]; its ``labels``, if
any, are the next token of every position [N, L]. ``load_dataset`` returns the
*batched* layout (every array with the input's rank, axis 0 the batch) when every input allows
it (``[N, 1, ...]`` for a batch-1 input is squeezed to ``[N, ...]``), else the *samples* layout
(every array ``[N, *input_shape]``); ``split_feeds`` cuts either into model feeds, one sample at
a time where the batch is fixed. Loading never unpickles (``allow_pickle=False``; object arrays
are refused).

This module imports only numpy and onnx (the API calls ``inspect_dataset`` on upload).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from service.engine.decoder import DecoderSpec, decoder_arrays, decoder_spec
from service.engine.errors import EngineError
from service.engine.ingest import graph_inputs
from service.engine.inputs import InputSlot, input_signature
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
    _check_headers(path, infos)
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


def _check_headers(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Every member's .npy header (numpy's own reader, ``numpy.lib.format``) must describe
    exactly the bytes the member holds: numpy allocates an array from the header's shape
    before reading a member of a zip, so a header that claims 2^40 elements would allocate
    terabytes. Refused here, before anything is allocated."""
    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as zf:
        for info in infos:
            try:
                with zf.open(info) as member:
                    version = npy.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(member)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npy.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"unknown .npy version {version}")
                    header_bytes = member.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError):
                raise EngineError("invalid_dataset", "an array of the dataset has no valid "
                                  ".npy header", {"member": info.filename[:200]}) from None
            if dtype.hasobject:
                continue  # refused (needs pickle) when read, with its own message
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed != info.file_size - header_bytes:
                raise EngineError(
                    "invalid_dataset",
                    f"array {info.filename[:-4]!r} declares shape {tuple(shape)} ({claimed} "
                    f"bytes) but holds {info.file_size - header_bytes} bytes",
                    {"member": info.filename[:200]},
                )


def _samples(arrays: dict[str, np.ndarray]) -> int:
    counts = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise EngineError("invalid_dataset", "all arrays must have the same number of samples "
                          "(axis 0)", {"samples": counts})
    n = next(iter(counts.values()))
    if n == 0:
        raise EngineError("invalid_dataset", "the dataset has no samples")
    return n


def _check_token_labels(labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise EngineError("invalid_dataset", "'labels' of token sequences must be a 2-D "
                          "integer array [N, L]: the next token of every position (-100 "
                          "where there is none)")
    if labels.dtype.kind == "i" and ((labels < 0) & (labels != -100)).any():
        raise EngineError("invalid_dataset", "'labels' must be token ids or -100")
    return labels.astype(np.int64)


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
    if LABELS in arrays:  # a class per sample, or (token sequences) the next token per position
        (_check_token_labels if arrays[LABELS].ndim == 2 else _check_labels)(arrays[LABELS])
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
    decoder = decoder_spec(model)
    if decoder is not None:
        arrays, labels = _decoder_dataset(decoder, arrays)
    else:
        labels = _check_labels(arrays.pop(LABELS)) if LABELS in arrays else None
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise EngineError("invalid_dataset", "dataset arrays must be named after the model "
                          f"inputs {names} (plus optional 'labels')",
                          {"missing": missing, "unexpected": extra})
    arrays_in: dict[str, np.ndarray] = {}
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
        arrays_in[v.name] = arr
    return _canonical(input_signature(model), arrays_in), labels


def _decoder_dataset(spec: DecoderSpec, arrays: dict[str, np.ndarray]) -> tuple[
        dict[str, np.ndarray], np.ndarray | None]:
    """A causal decoder's dataset: token sequences ``input_ids`` [N, L] (ids in the
    vocabulary), optional ``labels`` [N, L] (next tokens, -100 for none); the other decoder
    inputs (mask, positions, an empty past) are made from the ids when absent, one sequence per
    row (``service.engine.decoder.decoder_arrays``)."""
    arrays = dict(arrays)
    ids = arrays.get(spec.input_ids)
    if ids is None or ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise EngineError("invalid_dataset", f"a decoder's dataset holds {spec.input_ids!r}: "
                          "token ids [N, L] (integers), N sequences of L tokens",
                          {"input": spec.input_ids})
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= spec.vocab):
        raise EngineError("invalid_dataset", f"{spec.input_ids!r} holds ids outside the "
                          f"vocabulary [0, {spec.vocab})")
    labels = arrays.pop(LABELS, None)
    if labels is not None:
        labels = _check_token_labels(labels)
        if labels.shape != ids.shape:
            raise EngineError("invalid_dataset", f"'labels' has shape {list(labels.shape)}; "
                              f"it must be {list(ids.shape)} like {spec.input_ids!r}")
        if int(labels.max(initial=0)) >= spec.vocab:
            raise EngineError("invalid_dataset", "'labels' holds ids outside the vocabulary")
    for name, arr in decoder_arrays(spec, ids).items():
        arrays.setdefault(name, arr)
    return arrays, labels


def _fits(shape: tuple[int, ...], dims: tuple[int | None, ...]) -> bool:
    return len(shape) == len(dims) and all(d is None or s == d for s, d in
                                           zip(shape, dims, strict=True))


def _canonical(slots: list[InputSlot], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array checked against its input, then all in one layout (module docstring)."""
    sample_form: dict[str, bool] = {}
    for slot in slots:
        arr, dims = arrays[slot.name], slot.dims
        if dims is None:  # no declared shape: taken as rows along axis 0
            sample_form[slot.name] = False
            continue
        if arr.ndim == len(dims) + 1 and _fits(arr.shape[1:], dims):
            sample_form[slot.name] = True
        elif dims and arr.ndim == len(dims) and _fits(arr.shape[1:], dims[1:]) and (
                dims[0] is None or arr.shape[0] % dims[0] == 0):
            sample_form[slot.name] = False
        else:
            expected = "[N" + "".join(f", {'?' if d is None else d}" for d in dims) + "]"
            rows = " or rows along its batch axis 0 at the input's rank" if dims else ""
            raise EngineError(
                "invalid_dataset",
                f"array {slot.name!r} has shape {list(arr.shape)}; the model input is "
                f"{_fmt(dims)} (rank {len(dims)}): give {expected} (N samples of the input's "
                f"shape){rows}",
                {"input": slot.name, "shape": list(arr.shape), "expected": expected})
    out: dict[str, np.ndarray] = {}
    squeezable = all(
        not sample_form[s.name] or (s.dims and s.dims[0] in (None, 1)
                                    and arrays[s.name].shape[1] == 1)
        for s in slots)
    if squeezable:
        for slot in slots:
            arr = arrays[slot.name]
            out[slot.name] = np.ascontiguousarray(arr[:, 0] if sample_form[slot.name] else arr)
        return out
    for slot in slots:  # the samples layout: rows of a batched array become batch-1 samples
        arr = arrays[slot.name]
        if not sample_form[slot.name]:
            if slot.dims and slot.dims[0] not in (None, 1):
                raise EngineError(
                    "invalid_dataset",
                    f"array {slot.name!r} has shape {list(arr.shape)}: with other inputs given "
                    f"as [N, *input_shape], give it as [N, {_fmt(slot.dims)[1:-1]}] too",
                    {"input": slot.name, "shape": list(arr.shape)})
            arr = arr[:, None]
        out[slot.name] = np.ascontiguousarray(arr)
    return out


def samples_layout(model: onnx.ModelProto, dataset: dict[str, np.ndarray]) -> bool:
    """Whether a loaded dataset is in the samples layout (arrays ``[N, *input_shape]``)."""
    return any(s.dims is not None and s.name in dataset
               and dataset[s.name].ndim == len(s.dims) + 1 for s in input_signature(model))


def split_feeds(
    model: onnx.ModelProto,
    dataset: dict[str, np.ndarray],
    labels: np.ndarray | None,
    max_feeds: int,
    group: int = 1,
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray] | None]:
    """Cut a loaded dataset into at most ``max_feeds`` model feeds (labels alike).

    Samples layout: one sample per feed. Batched layout: the input's fixed batch B rows at a
    time (the first input with a fixed axis 0), or ``group`` rows where the batch is dynamic.
    """
    total = next(iter(dataset.values())).shape[0]
    if samples_layout(model, dataset):
        count = min(max_feeds, total)
        feeds = [{k: a[i, ...] for k, a in dataset.items()} for i in range(count)]  # 0-d kept
        chunks = None if labels is None else [labels[i:i + 1] for i in range(count)]
        return feeds, chunks
    fixed = next((s.dims[0] for s in input_signature(model)
                  if s.dims and s.dims[0] is not None), None)
    unit = fixed or max(1, group)
    count = min(max_feeds, total // unit if fixed else -(-total // unit))
    feeds = [{k: a[i * unit:(i + 1) * unit] for k, a in dataset.items()} for i in range(count)]
    chunks = None if labels is None else [labels[i * unit:(i + 1) * unit] for i in range(count)]
    return feeds, chunks


def _fmt(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# Every third sample (or fixed-size batch of samples) is kept out of calibration and training.
HOLDOUT_EVERY = 3


def split_for_evaluation(
    model: onnx.ModelProto, dataset: dict[str, np.ndarray], labels: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray] | None,
           np.ndarray | None, dict]:
    """Split a loaded dataset so that evaluation never sees a calibration/training sample.

    Every third unit is held out for evaluation (a unit is one sample, or the model's fixed
    batch of rows); with two units the second is. Returns (train, train labels, held-out,
    held-out labels, record); held-out is None when the dataset has a single unit (then the
    record says the evaluation is in-sample). ``record`` carries the counts and the rule.
    """
    total = next(iter(dataset.values())).shape[0]
    fixed = None
    if not samples_layout(model, dataset):
        fixed = next((s.dims[0] for s in input_signature(model)
                      if s.dims and s.dims[0] is not None), None)
    unit = fixed or 1
    units = total // unit
    if units < 2:
        return dataset, labels, None, None, {
            "disjoint": False, "samples": int(total), "calibration_samples": int(total),
            "evaluation_samples": int(total),
            "rule": "a single sample (or batch): evaluated on the samples it was calibrated on"}
    held_units = np.arange(units)
    held_units = held_units[held_units % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] if units >= 3 \
        else np.array([1])
    held_mask = np.zeros(total, dtype=bool)
    for u in held_units:
        held_mask[u * unit:(u + 1) * unit] = True
    held_mask[units * unit:] = False  # a ragged tail stays with calibration
    train = {k: a[~held_mask] for k, a in dataset.items()}
    held = {k: a[held_mask] for k, a in dataset.items()}
    record = {
        "disjoint": True, "samples": int(total),
        "calibration_samples": int((~held_mask).sum()),
        "evaluation_samples": int(held_mask.sum()),
        "rule": (f"every {HOLDOUT_EVERY}rd " + ("sample" if unit == 1 else f"batch of {unit}")
                 + " held out for evaluation; calibration and training use the rest"),
        "evaluation_indices": [int(i) for i in np.flatnonzero(held_mask)[:64]],
    }
    return (train, None if labels is None else labels[~held_mask], held,
            None if labels is None else labels[held_mask], record)
