"""External data: the weights a model keeps outside its ``.onnx`` file, read and inlined.

Only an archive upload may carry external data (a lone ``.onnx`` file has no data files of its
own). Every location is confined to the extracted archive by our own rules (relative, no ``..``,
no absolute or drive path, no link anywhere on the way), every offset and length must lie inside
its file and match what the tensor's dims and dtype need, and the total is bounded; the bytes
are then inlined, so later stages never follow a path from the upload. Depends on ``walk``
and on ``archive`` (the path rule it shares with member names).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from service.engine.errors import EngineError
from service.engine.ingest.archive import _relative_path
from service.engine.ingest.walk import _all_tensors, _expected_nbytes
from service.engine.limits import EngineLimits


def _inline_external_data(model: onnx.ModelProto, base: Path | None, limits: EngineLimits) -> bool:
    """Read every external tensor from files confined to ``base`` and inline it.

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
        return False
    base = base.resolve()
    found = False
    total = 0
    handles: dict[Path, int] = {}
    for t, _ in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        found = True
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
        if resolved not in handles:
            handles[resolved] = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        data = os.pread(handles[resolved], length, offset)
        t.raw_data = data
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
    for fd in handles.values():
        os.close(fd)
    return found
