"""External data: the weights a model keeps outside its ``.onnx`` file, verified, then inlined
or kept on disk.

Only an archive upload may carry external data (a lone ``.onnx`` file has no data files of its
own). Every location is confined to the extracted archive by our own rules (relative, no ``..``,
no absolute or drive path, no link anywhere on the way), every offset and length must lie inside
its file and match what the tensor's dims and dtype need, and the total is bounded
(``verify_external_data``). Then either the bytes are inlined (``_inline_external_data``), or,
for weights past ``EngineLimits.external_data_inline_bytes`` (``keep_external_data``), each
tensor's entries are rewritten from what was verified (the upload's own keys dropped) with the
engine's ``basepath`` (``service.engine.external``): later stages read them one tensor at a
time and never follow a path the upload wrote. Depends on ``walk`` and on ``archive`` (the path
rule it shares with member names).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from service.engine.errors import EngineError
from service.engine.external import point_at
from service.engine.ingest.archive import _relative_path
from service.engine.ingest.walk import _all_tensors, _expected_nbytes
from service.engine.limits import EngineLimits

PROTOBUF_BYTES = 2**31 - 1  # what one serialised ONNX file can hold: beyond, always kept


def _inline_external_data(model: onnx.ModelProto, base: Path | None, limits: EngineLimits) -> bool:
    """Read every external tensor from files confined to ``base`` and inline it."""
    spans = verify_external_data(model, base, limits)
    inline_spans(spans)
    return bool(spans)


def inline_spans(spans: list[tuple[TensorProto, Path, int, int]]) -> None:
    """Read each verified span (``verify_external_data``) into its tensor."""
    handles: dict[Path, int] = {}
    try:
        for t, resolved, offset, length in spans:
            if resolved not in handles:
                handles[resolved] = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            t.raw_data = os.pread(handles[resolved], length, offset)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    finally:
        for fd in handles.values():
            os.close(fd)


def keep_external_data(
    spans: list[tuple[TensorProto, Path, int, int]], base: Path
) -> None:
    """Point every verified external tensor (``verify_external_data``'s ``spans``) at its
    file under ``base`` with the engine's entries only (location, offset, length, basepath)."""
    base = base.resolve()
    for t, resolved, offset, length in spans:
        point_at(t, base, resolved.relative_to(base).as_posix(), offset, length)


def must_keep_external(spans: list[tuple[TensorProto, Path, int, int]],
                       limits: EngineLimits) -> bool:
    """Whether verified external data is too large to inline (past the inline limit, or past
    what one protobuf file holds)."""
    total = sum(length for *_, length in spans)
    return bool(spans) and (total > limits.external_data_inline_bytes
                            or total > PROTOBUF_BYTES)


def verify_external_data(
    model: onnx.ModelProto, base: Path | None, limits: EngineLimits
) -> list[tuple[TensorProto, Path, int, int]]:
    """Every external tensor of ``model`` as (tensor, resolved file, offset, length), each
    checked; nothing is read.

    Location rules (ONNX >= 1.21 semantics, enforced here ourselves): relative path, no ``..``,
    no absolute or drive path, no symlink anywhere on the way, resolved inside ``base``;
    offset/length inside the file; length equal to what dims x dtype need.
    """
    if base is None:
        if any(t.data_location == TensorProto.EXTERNAL for t, _ in _all_tensors(model)):
            raise EngineError(
                "invalid_model",
                "the model keeps weights in external data files; "
                "send the .onnx file and its data files together in a .zip or "
                ".tar archive",
            )
        return []
    base = base.resolve()
    total = 0
    spans: list[tuple[TensorProto, Path, int, int]] = []
    for t, _ in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        name = t.name or "<unnamed>"
        rel = loc.replace("\\", "/")
        rel_path = _relative_path(loc)
        if rel_path is None:
            raise EngineError(
                "invalid_model",
                f"tensor {name!r} points at external data outside "
                "the upload (absolute path or '..'); external data files must "
                "sit next to the .onnx file",
            )
        candidate = base.joinpath(*rel_path.parts)
        # Walk each component: refuse symlinks (they could lead anywhere).
        cur = base
        for part in rel_path.parts:
            cur = cur / part
            if cur.is_symlink():
                raise EngineError(
                    "invalid_model",
                    f"external data of tensor {name!r} is a link; send regular files",
                )
        resolved = candidate.resolve()
        if base not in resolved.parents or not resolved.is_file():
            raise EngineError(
                "invalid_model",
                f"external data file {rel!r} of tensor {name!r} "
                "is missing from the upload; send the .onnx file and its data "
                "files together in a .zip or .tar archive",
            )
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise EngineError(
                "invalid_model", f"tensor {name!r} has a malformed external data offset/length"
            ) from None
        fsize = resolved.stat().st_size
        if length is None:
            length = fsize - offset
        if offset < 0 or length < 0 or offset + length > fsize:
            raise EngineError(
                "invalid_model",
                f"tensor {name!r} reads beyond its external data file (bad offset or length)",
                {"offset": offset, "length": length, "file_bytes": fsize},
            )
        expected = _expected_nbytes(t)
        if expected is not None and expected != length:
            raise EngineError(
                "invalid_model",
                f"tensor {name!r} declares {expected} bytes "
                f"(dims x dtype) but its external data holds {length}",
            )
        total += length
        if total > limits.max_model_bytes:
            raise EngineError(
                "model_too_large",
                "the model's weights exceed the size limit",
                {"limit": limits.max_model_bytes},
            )
        spans.append((t, resolved, offset, length))
    return spans
