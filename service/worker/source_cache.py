"""``SourceCache``: the worker's local copies of uploaded models and datasets, by content.

Uploads are content addressed (their records carry the SHA-256 and size), so a model that
comes back (a CI pipeline submitting it on every run, several recipes or devices for one
model, a retried job) need not cross the network again: the worker copies it from here.

Rules:
- an entry is named by the SHA-256 of its bytes and is used only for a record with that
  SHA-256 and size; entries are written whole (temp file, then rename) by the worker itself,
  from a download whose size and SHA-256 matched the record;
- every use checks the copy's SHA-256 against the record (hashed while copying): an entry
  changed on disk since is dropped and the bytes are downloaded again;
- jobs get a *copy*, never the entry itself: the engine process parses untrusted models, and
  nothing it does to its input can reach the next job's;
- bounded in bytes (``worker_source_cache_mb``), least recently used entries go first;
  several worker processes may share the directory (renames are atomic, a lost race is a miss).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class SourceCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max(0, int(max_bytes))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def fetch(
        self, sha256: str, size: int, dest: Path, download: Callable[[Path], None]
    ) -> bool:
        """Put the bytes with ``sha256``/``size`` at ``dest``: copied from the cache when there
        (True), else downloaded with ``download(dest)`` and kept for next time (False).
        Raises ``ValueError`` if a download does not have the record's size."""
        if not self.enabled or not _SHA256.fullmatch(sha256) or size > self.max_bytes:
            download(dest)
            return False
        entry = self.directory / sha256
        try:
            if entry.stat().st_size == size:
                if _copy_hashing(entry, dest) == sha256:
                    os.utime(entry)  # recently used
                    return True
                log.warning("source cache: entry %s does not hash to its name; dropped", sha256)
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        except FileNotFoundError:  # not cached, or evicted by another process just now
            pass
        download(dest)
        if dest.stat().st_size != size:
            raise ValueError(f"downloaded {dest.stat().st_size} bytes, the record says {size}")
        if _sha256_of(dest) != sha256:
            raise ValueError("the downloaded bytes do not have the record's SHA-256")
        self._keep(entry, dest, size)
        return False

    def _keep(self, entry: Path, source: Path, size: int) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._evict(room_for=size)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, entry)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:  # a full or read-only disk costs the cache, never the job
            log.warning("source cache: could not keep %s: %s", entry.name, exc)

    def _evict(self, room_for: int) -> None:
        entries = []
        for path in self.directory.iterdir():
            if path.name.startswith(".incoming-"):  # left by a process killed mid-copy
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime > 3600:
                        path.unlink()
            elif _SHA256.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):  # oldest use first
            if total + room_for <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size


def _copy_hashing(source: Path, dest: Path) -> str:
    """Copy ``source`` to ``dest``; the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
