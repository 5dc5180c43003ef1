"""Sniffing: what an upload is, decided by its bytes, and the parse that confirms it is ONNX.

``sniff`` classifies an upload as a single ONNX file, a zip or a tar archive, and refuses the
rest by name: formats whose loading runs code (pickles, ``torch.save`` zips, TorchScript,
``torch.export`` ``.pt2``) as ``unsafe_format``, other model and array formats (NumPy, HDF5,
TensorFlow Lite, safetensors, a Git LFS pointer) as ``not_onnx``, each with the hint to export
ONNX (``EXPORT_HINT``). ``_parse_onnx`` then parses the ONNX file under a memory-headroom check.
The bounded tar header reader (``_BoundedTarInfo``) lives here because sniffing is the first to
open a tar; extraction uses it too. The bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import onnx

from service.engine.errors import EngineError

EXPORT_HINT = (
    "send an ONNX model instead: convert it on your side with `edgepress export` "
    "(PyTorch module + example inputs -> .onnx), then upload the .onnx file"
)


def sniff(path: Path, filename: str | None = None) -> str:
    """Classify an upload by its bytes: "onnx", "archive_zip" or "archive_tar"; refuse the rest.

    The file name only sharpens messages: a pickle named ``model.onnx`` is still a pickle.
    """
    name = (filename or path.name).lower()
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise EngineError("not_onnx", "the upload is empty; " + EXPORT_HINT)
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise EngineError(
            "not_onnx",
            "the upload is a Git LFS pointer, not the model: fetch the real file "
            "(`git lfs pull`) and upload that",
        )
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        raise EngineError(
            "unsafe_format",
            "the upload is a Python pickle (e.g. a torch checkpoint); loading it would run "
            "code, so it is refused; " + EXPORT_HINT,
        )
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        _refuse_code_zip(path, name)
        return "archive_zip"
    if head.startswith(b"\x93NUMPY"):
        raise EngineError("not_onnx", "the upload is a NumPy array, not a model; " + EXPORT_HINT)
    if head.startswith(b"\x89HDF"):
        raise EngineError("not_onnx", "the upload is an HDF5 (Keras) file; " + EXPORT_HINT)
    if head[4:8] == b"TFL3":
        raise EngineError("not_onnx", "the upload is a TensorFlow Lite model; send ONNX instead")
    if _looks_like_safetensors(head):
        raise EngineError(
            "not_onnx",
            "the upload is a safetensors file: it holds weights but no graph; " + EXPORT_HINT,
        )
    if (
        head[257:262] == b"ustar"
        or head[:2] in (b"\x1f\x8b", b"BZ")
        or head[:6] == (b"\xfd7zXZ\x00")
    ):
        if _is_tar(path):
            return "archive_tar"
        raise EngineError(
            "not_onnx",
            "the upload is a compressed file but not a tar archive holding an ONNX model",
        )
    return "onnx"


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 27) and head[8:9] == b"{"


def _is_tar(path: Path) -> bool:
    # tarfile.is_tarfile would read a first PAX header whole, whatever size it declares.
    try:
        with tarfile.open(path, mode="r:*", tarinfo=_BoundedTarInfo):
            return True
    except EngineError:
        return True  # a tar with an oversized header: _extract_tar refuses it by name
    except (OSError, EOFError, tarfile.TarError):
        return False


def _refuse_code_zip(path: Path, name: str) -> None:
    """Refuse zips written by torch.save / torch.jit.save / torch.export.save."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise EngineError(
            "invalid_archive", "the upload looks like a zip archive but cannot be read"
        ) from None
    has_onnx = any(n.lower().endswith(".onnx") for n in names)
    markers = (
        "data.pkl",
        "constants.pkl",
        ".pkl",
        "archive_format",
        "serialized_exported_program",
        "serialized_model.json",
        "/code/",
        "byteorder",
    )
    code_like = [n for n in names if any(m in n for m in markers)]
    if (code_like and not has_onnx) or name.endswith((".pt", ".pth", ".pt2")):
        what = (
            "a torch.export .pt2 archive"
            if (
                name.endswith(".pt2")
                or any("archive_format" in n or "exported_program" in n for n in names)
            )
            else (
                "a TorchScript archive"
                if any("/code/" in n or "constants.pkl" in n for n in names)
                else "a torch.save checkpoint (zip with pickled data)"
            )
        )
        raise EngineError(
            "unsafe_format",
            f"the upload is {what}; loading it unpickles Python objects, which runs code, so it "
            "is refused; " + EXPORT_HINT,
        )


# Largest PAX / GNU long-name header: tarfile reads one whole into memory before yielding the
# member it describes, so its declared size must be bounded before that read.
_MAX_TAR_META_BYTES = 64 * 1024


_TAR_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
     tarfile.GNUTYPE_LONGLINK}
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers before tarfile reads them whole.

    ``tarinfo=`` is tarfile's public hook; ``_proc_member`` is where CPython dispatches each
    header (PAX, GNU long names) and has been since Python 2.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_META_TYPES and self.size > _MAX_TAR_META_BYTES:
            raise EngineError(
                "invalid_archive",
                "the tar archive has an oversized extended (PAX or long-name) header",
                {"bytes": self.size, "limit": _MAX_TAR_META_BYTES},
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


_CODE_SUFFIXES = (".pt", ".pth", ".pt2", ".ckpt", ".pkl", ".pickle", ".jit", ".joblib")


def _ensure_memory_headroom(needed: int) -> None:
    """Raise MemoryError when the process's memory limit (``devices.host.memory_limit``) cannot
    fit ``needed`` more bytes.

    Under a memory limit, protobuf reports a failed allocation as a parse error: without this
    check a model too big for the limit would be refused as "not ONNX" instead of as too big.
    """
    from service.engine.devices.host import memory_limit

    space = memory_limit()
    if space is None:
        return
    soft, used = space
    if used + needed > soft:
        raise MemoryError(f"{needed} bytes needed, {max(0, soft - used)} left under the limit")


def _parse_onnx(path: Path, filename: str) -> onnx.ModelProto:
    # The bytes and the parsed message are both in memory while parsing.
    _ensure_memory_headroom(2 * path.stat().st_size)
    data = path.read_bytes()
    model = onnx.ModelProto()
    ok = True
    try:
        model.ParseFromString(data)
    except MemoryError:
        raise
    except Exception:  # protobuf's DecodeError and friends
        ok = False
    if ok and model.HasField("graph") and model.ir_version > 0:
        return model
    if filename.lower().endswith(_CODE_SUFFIXES):
        # Content decides; the name only tells us what the user probably sent.
        raise EngineError(
            "unsafe_format",
            f"{PurePosixPath(filename).suffix!r} files are "
            "PyTorch/pickle formats whose loading runs code; " + EXPORT_HINT,
        )
    raise EngineError(
        "not_onnx",
        "the upload is not an ONNX model (it does not parse as an "
        "ONNX protobuf with a graph); " + EXPORT_HINT,
    )
