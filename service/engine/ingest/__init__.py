"""Ingest: read an untrusted upload, refuse what is unsafe or broken, and describe the model.

Accepted: a single ``.onnx`` file, or a ``.zip``/``.tar`` (optionally gzip/bz2/xz) archive holding
one ``.onnx`` file and its external-data files. Everything whose loading runs code is refused
(pickled checkpoints, ``torch.save`` zips, TorchScript, ``torch.export`` ``.pt2``): PyTorch users
convert on their side with ``edgepress export``. Nothing is ever unpickled.

This package imports only onnx and numpy (the API calls ``inspect_upload`` on upload).

Public entry points:

- ``inspect_upload(path, filename=None, limits=None) -> dict``: validate and describe (API).
- ``load_model(path, workdir, filename=None, limits=None) -> IngestedModel``: the same checks,
  returning the model with its external data inlined (worker / pipeline).
- ``describe(model) -> dict`` and ``detect_quantization(model) -> list[str]``.

Its modules, bottom up (each imports only from modules listed before it):

- ``sniff``: what an upload is, by its bytes (code-running formats refused), and the ONNX parse.
- ``archive``: safe zip/tar extraction and the archive's one ``.onnx`` file.
- ``walk``: every graph, function body and stored tensor of a model.
- ``external_data``: an archive's external data, confined to it and inlined.
- ``validate``: the checks that refuse a malformed, hostile or unloadable model.
- ``describe``: the JSON description of a validated model.

This file holds the entry points, which run them in that order, and re-exports the names callers
import from ``service.engine.ingest``. ``sniff``, ``validate`` and ``describe`` are both a module
and its main function: as attributes of this package they are the functions (as before the
split); reach a module's other names with ``from service.engine.ingest.<module> import ...``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from service.engine.errors import EngineError
from service.engine.ingest.archive import extract_archive
from service.engine.ingest.describe import (
    describe,
    detect_quantization,
    dtype_name,
    graph_inputs,
    parameter_count,
)
from service.engine.ingest.external_data import (
    inline_spans,
    keep_external_data,
    must_keep_external,
    verify_external_data,
)
from service.engine.ingest.sniff import EXPORT_HINT, _parse_onnx, sniff
from service.engine.ingest.validate import (
    MAX_OPSET,
    RUNTIME_MAX_IR_VERSION,
    expanded_node_count,
    fit_ir_version,
    unknown_dynamic_dims,
    validate,
)
from service.engine.ingest.validate import _subgraph_free_names as _subgraph_free_names
from service.engine.ingest.walk import iter_graphs
from service.engine.limits import EngineLimits


@dataclass
class IngestedModel:
    """A validated model: self-contained (external data inlined), or, when ``external_bytes``
    is not 0, its graph with its large weights kept in the upload's verified files (read one
    tensor at a time, ``service.engine.external``)."""

    model: onnx.ModelProto
    description: dict
    format: str  # "onnx" | "onnx_archive"
    upload_bytes: int
    notes: list[str] = field(default_factory=list)
    external_bytes: int = 0  # weights bytes kept on disk (0: everything in ``model``)


def inspect_upload(
    path: Path, filename: str | None = None, limits: EngineLimits | None = None
) -> dict:
    """Validate an uploaded model and describe it (no onnxruntime, no torch).

    Returns ``{format, opset, ir_version, producer, inputs, outputs, parameter_count,
    node_count, external_data, already_quantized, quantization, op_types, ...}``.
    Raises ``EngineError`` with code not_onnx, unsafe_format, invalid_archive, invalid_model,
    model_too_large or unsupported_model.
    """
    with tempfile.TemporaryDirectory(prefix="edgepress-inspect-") as tmp:
        # Never inlined here: the checks read external weights one tensor at a time, so the
        # API's inspection memory does not grow with the model.
        ingested = load_model(Path(path), Path(tmp), filename=filename, limits=limits,
                              inline=False)
    return ingested.description


def load_model(
    path: Path,
    workdir: Path,
    *,
    filename: str | None = None,
    limits: EngineLimits | None = None,
    inline: bool = True,
) -> IngestedModel:
    """Read, check and validate an upload; archives are extracted under ``workdir``.

    External data is read only from files confined to the upload's directory and checked
    (``external_data.verify_external_data``). Up to ``limits.external_data_inline_bytes``
    (and 2 GiB) it is inlined: the model holds all its weights in memory. Beyond, the graphs'
    initializers stay in those verified files, pointed at by the engine's own entries
    (``IngestedModel.external_bytes``); either way later stages never follow a path the upload
    wrote. ``inline=False`` keeps every such weight on disk whatever its size
    (``description["external_data_kept_bytes"]`` still says what a job will keep).
    """
    limits = limits or EngineLimits()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise EngineError("not_onnx", "the upload could not be read") from None
    name = filename or path.name
    kind = sniff(path, name)
    if kind == "archive_zip" or kind == "archive_tar":
        onnx_file = extract_archive(path, kind, size, workdir, limits)
        fmt = "onnx_archive"
    else:
        onnx_file = path
        fmt = "onnx"
    if onnx_file.stat().st_size > limits.max_model_bytes:
        raise EngineError(
            "model_too_large",
            "the model file is larger than the limit",
            {"bytes": onnx_file.stat().st_size, "limit": limits.max_model_bytes},
        )
    model = _parse_onnx(onnx_file, name)
    notes: list[str] = []
    # A lone .onnx upload has no data files of its own: whatever sits next to it on the server
    # is not the user's, so external data is only read from inside an uploaded archive.
    base = onnx_file.parent if fmt == "onnx_archive" else None
    spans = verify_external_data(model, base, limits)
    kept_bytes = 0
    will_keep = base is not None and must_keep_external(spans, limits)
    if base is not None and (will_keep or not inline):
        # Only main-graph initializers stay on disk (what streaming passes, ``save`` and the
        # checker's view ``external.checkable`` handle); tensors of subgraphs, Constant
        # attributes, sparse tensors and function bodies are inlined.
        graph_inits = {id(t) for t in model.graph.initializer}
        kept = [span for span in spans if id(span[0]) in graph_inits]
        inline_spans([span for span in spans if id(span[0]) not in graph_inits])
        keep_external_data(kept, base)
        if will_keep:
            kept_bytes = sum(length for *_, length in kept)
            notes.append(f"{kept_bytes} bytes of weights kept in external data (read one "
                         "tensor at a time)")
    else:
        inline_spans(spans)
    external = bool(spans)
    dynamic = sum(unknown_dynamic_dims(g) for g, _ in iter_graphs(model.graph))
    if dynamic:
        notes.append(f"{dynamic} dims declared as -1 or 0 read as dynamic dims")
    validate(model, limits)
    description = describe(model)
    description["format"] = fmt
    description["external_data"] = external
    description["upload_bytes"] = size
    description["external_data_kept_bytes"] = kept_bytes
    return IngestedModel(
        model=model, description=description, format=fmt, upload_bytes=size, notes=notes,
        external_bytes=kept_bytes,
    )


__all__ = [
    "EXPORT_HINT",
    "MAX_OPSET",
    "RUNTIME_MAX_IR_VERSION",
    "IngestedModel",
    "describe",
    "detect_quantization",
    "dtype_name",
    "expanded_node_count",
    "fit_ir_version",
    "graph_inputs",
    "inspect_upload",
    "iter_graphs",
    "load_model",
    "parameter_count",
    "sniff",
    "unknown_dynamic_dims",
    "validate",
]
