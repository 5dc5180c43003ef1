"""Receiving uploads: streamed to a local temporary file, hashed on the way, size-capped.

The API never holds an upload in memory: it reads fixed-size chunks from the WSGI stream (raw
body, with or without Content-Length) or from Werkzeug's spooled multipart part, writes them to
a temporary file and hashes them. Over the limit the file is removed and 413 is raised; an
aborted or truncated body raises 400 and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flask import Request

from service.errors import PayloadTooLarge, ServiceError
from service.storage.s3 import S3ObjectStore

CHUNK = 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ReceivedFile:
    path: Path
    sha256: str
    size: int
    filename: str | None


def clean_filename(name: str | None) -> str | None:
    """Keep a display name only: no directories, no odd characters, bounded length."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).strip("._")[:128]
    return base or None


@contextlib.contextmanager
def receive_stored_object(
    store: S3ObjectStore, key: str, *, max_bytes: int, scratch_dir: str | None, filename: str | None
) -> Iterator[ReceivedFile]:
    """A file the client put straight into the store (presigned POST), fetched to a temporary
    path and hashed like a direct upload; the temporary file is removed on exit."""
    fd, name = tempfile.mkstemp(prefix="upload-", dir=scratch_dir)
    os.close(fd)
    path = Path(name)
    try:
        try:
            store.download_file(key, path)
        except FileNotFoundError:
            raise ServiceError(
                "nothing was uploaded to this upload's URL yet", code="upload_missing", status=409
            ) from None
        size = path.stat().st_size
        if size > max_bytes:
            raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
        if size == 0:
            raise ServiceError("the upload is empty", code="empty_upload", status=422)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
        yield ReceivedFile(path, digest.hexdigest(), size, filename)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def receive_upload(
    request: Request, *, max_bytes: int, scratch_dir: str | None
) -> Iterator[ReceivedFile]:
    """Stream the request's file to a temporary path; the file is removed on exit."""
    declared = request.content_length
    if declared is not None and declared > max_bytes + 64 * 1024:
        raise PayloadTooLarge(
            f"upload is {declared} bytes; the limit is {max_bytes}", code="payload_too_large"
        )
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None:
            raise ServiceError(
                'multipart upload needs a "file" part', code="missing_file", status=400
            )
        stream: BinaryIO = part.stream  # type: ignore[assignment]
        filename = clean_filename(part.filename)
    else:
        stream = request.stream  # type: ignore[assignment]
        filename = clean_filename(request.args.get("filename"))
    fd, name = tempfile.mkstemp(prefix="upload-", dir=scratch_dir)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = stream.read(CHUNK)
                except (OSError, ValueError) as exc:
                    raise ServiceError(
                        "the upload was interrupted", code="upload_incomplete", status=400
                    ) from exc
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(
                        f"upload exceeds the limit of {max_bytes} bytes", code="payload_too_large"
                    )
                digest.update(chunk)
                out.write(chunk)
        if declared is not None and mimetype != "multipart/form-data" and size != declared:
            raise ServiceError("the upload was truncated", code="upload_incomplete", status=400)
        if size == 0:
            raise ServiceError("the upload is empty", code="empty_upload", status=422)
        yield ReceivedFile(path, digest.hexdigest(), size, filename)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
