"""Archives: a ``.zip`` or ``.tar`` upload (tar optionally gzip/bz2/xz) extracted safely.

``extract_archive`` confines member names (relative, no ``..``, no absolute or drive path, no
NUL), refuses links and special files, and bounds the archive before and while it is extracted:
member count, total expanded size, compression ratio (the zip bomb guard), and what really comes
out of the decompressor against each member's declared size; then it picks the archive's one
``.onnx`` file. Depends only on ``sniff`` (the export hint and the bounded tar header reader).
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from service.engine.errors import EngineError
from service.engine.ingest.sniff import EXPORT_HINT, _BoundedTarInfo
from service.engine.limits import EngineLimits

_CHUNK = 1 << 20


def extract_archive(
    path: Path, kind: str, size: int, workdir: Path, limits: EngineLimits
) -> Path:
    """Extract an upload ``sniff`` found to be an archive (``kind`` "archive_zip" or
    "archive_tar", ``size`` its bytes) into a new folder under ``workdir``; return the one
    ``.onnx`` file in it. An upload larger than the expanded-size limit is refused first."""
    if size > limits.max_uncompressed_bytes:
        raise EngineError(
            "model_too_large",
            "the archive is larger than the limit",
            {"bytes": size, "limit": limits.max_uncompressed_bytes},
        )
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="archive-", dir=workdir))
    if kind == "archive_zip":
        _extract_zip(path, root, limits)
    else:
        _extract_tar(path, root, limits)
    return _pick_archive_model(root)


def _member_target(root: Path, name: str, regular_or_dir: bool) -> Path:
    """Where archive member ``name`` goes under ``root``: its path checked first, then its
    type (links and special files are refused)."""
    rel = _safe_member_path(name)
    if not regular_or_dir:
        raise EngineError(
            "invalid_archive",
            "the archive contains a link or special file; only regular files are accepted",
            {"member": name[:200]},
        )
    return root.joinpath(*rel.parts)


def _safe_member_path(raw: str) -> PurePosixPath:
    """A member name as a relative path without ``..``; refuse anything else."""
    p = _relative_path(raw)
    if p is None:
        raise EngineError(
            "invalid_archive",
            "the archive has a member outside the archive (absolute path or '..')",
            {"member": raw[:200]},
        )
    return p


def _relative_path(raw: str) -> PurePosixPath | None:
    """``raw`` (backslashes read as slashes) as a path that stays inside the folder it is read
    from, or None: empty, absolute, drive (``C:``), ``..`` anywhere or a NUL is not. The rule
    for archive member names and for the external-data locations inside an archive."""
    name = raw.replace("\\", "/")
    p = PurePosixPath(name)
    if (
        not name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name)
        or any(part == ".." for part in p.parts)
        or "\x00" in name
    ):
        return None
    return p


def _make_dirs(directory: Path, member: str) -> None:
    """Create a member's directory; a file already holding that name is the archive's fault."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EngineError(
            "invalid_archive",
            "the archive has a file and a directory of the same name",
            {"member": member[:200]},
        ) from None
    except OSError:
        raise EngineError(
            "invalid_archive", "an archive member cannot be extracted", {"member": member[:200]}
        ) from None


def _check_totals(count: int, total: int, packed: int, limits: EngineLimits) -> None:
    if count > limits.max_archive_members:
        raise EngineError(
            "invalid_archive",
            "the archive has too many members",
            {"members": count, "limit": limits.max_archive_members},
        )
    if total > limits.max_uncompressed_bytes:
        raise EngineError(
            "invalid_archive",
            "the archive expands beyond the size limit",
            {"bytes": total, "limit": limits.max_uncompressed_bytes},
        )
    if packed > 0 and total / packed > limits.max_compression_ratio:
        raise EngineError(
            "invalid_archive",
            "the archive's compression ratio is implausible for a model (zip bomb guard)",
            {"ratio": round(total / packed, 1), "limit": limits.max_compression_ratio},
        )


def _extract_zip(path: Path, root: Path, limits: EngineLimits) -> None:
    packed = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise EngineError("invalid_archive", "the zip archive cannot be read") from None
    with zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        _check_totals(len(infos), total, packed, limits)
        written = 0
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            target = _member_target(root, info.filename,
                                    not mode or mode in (stat.S_IFREG, stat.S_IFDIR))
            if info.is_dir():
                _make_dirs(target, info.filename)
                continue
            _make_dirs(target.parent, info.filename)
            # Headers can lie: count what actually comes out of the decompressor.
            budget = info.file_size
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(_CHUNK):
                        budget -= len(chunk)
                        written += len(chunk)
                        if budget < 0 or written > limits.max_uncompressed_bytes:
                            raise EngineError(
                                "invalid_archive",
                                "an archive member expands "
                                "beyond its declared size (zip bomb guard)",
                            )
                        dst.write(chunk)
            except FileExistsError:
                raise EngineError(
                    "invalid_archive",
                    "the archive has duplicate members",
                    {"member": info.filename[:200]},
                ) from None
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
                raise EngineError(
                    "invalid_archive",
                    "an archive member cannot be extracted (corrupt or unsupported compression)",
                    {"member": info.filename[:200]},
                ) from None


def _extract_tar(path: Path, root: Path, limits: EngineLimits) -> None:
    packed = path.stat().st_size
    try:
        tf = tarfile.open(path, mode="r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError, EOFError):
        raise EngineError("invalid_archive", "the tar archive cannot be read") from None
    with tf:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for m in tf:  # streaming: stop early on a member flood
                members.append(m)
                total += max(m.size, 0)
                _check_totals(len(members), total, packed, limits)
        except (tarfile.TarError, OSError, EOFError):
            raise EngineError("invalid_archive", "the tar archive is corrupt") from None
        for m in members:
            target = _member_target(root, m.name, m.isfile() or m.isdir())
            if m.isdir():
                _make_dirs(target, m.name)
                continue
            _make_dirs(target.parent, m.name)
            src = tf.extractfile(m)
            if src is None:
                raise EngineError(
                    "invalid_archive", "an archive member cannot be read", {"member": m.name[:200]}
                )
            try:
                with src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except FileExistsError:
                raise EngineError(
                    "invalid_archive", "the archive has duplicate members", {"member": m.name[:200]}
                ) from None
            except (tarfile.TarError, OSError, EOFError):
                raise EngineError("invalid_archive", "the tar archive is corrupt") from None


def _pick_archive_model(root: Path) -> Path:
    found = [
        p
        for p in root.rglob("*.onnx")
        if p.is_file()
        and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(root).parts)
    ]
    if not found:
        raise EngineError("invalid_archive", "the archive holds no .onnx file; " + EXPORT_HINT)
    if len(found) > 1:
        raise EngineError(
            "invalid_archive",
            "the archive holds more than one .onnx file; send one model per upload",
            {"models": sorted(str(p.relative_to(root)) for p in found)[:20]},
        )
    return found[0]
