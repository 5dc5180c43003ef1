"""``UploadStore``: models and datasets, stored once by content hash.

Layout, per kind (``service.uploads.records.UPLOAD_KINDS``): ``models/<id>/source`` (the bytes
as uploaded) + ``models/<id>/meta.json``; ``datasets/<id>/data.npz`` + ``datasets/<id>/meta.json``.
The id is derived from the SHA-256, so uploading the same bytes twice returns the same record.
The blob is written before the record, and the record with If-None-Match: a record that exists
always has its blob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import NotFound, PreconditionFailed
from service.jobs.record import utcnow
from service.storage.s3 import ObjectStore
from service.uploads.records import RecordT, UploadKind


class UploadStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def get(self, kind: UploadKind[RecordT], ident: str) -> RecordT:
        obj = self._store.get(kind.record_key(ident)) if kind.is_id(ident) else None
        if obj is None:
            raise NotFound(f"{kind.name} {ident!r} not found", code=kind.not_found_code)
        return kind.record.model_validate_json(obj.body)

    def find(self, kind: UploadKind[RecordT], sha256: str) -> RecordT | None:
        """The record of these bytes, if they are stored."""
        try:
            return self.get(kind, kind.id_for(sha256))
        except NotFound:
            return None

    def save(
        self,
        kind: UploadKind[RecordT],
        path: Path,
        *,
        sha256: str,
        size: int,
        filename: str | None,
        description: dict[str, Any],
    ) -> tuple[RecordT, bool]:
        """Store the file and its record; returns (record, created).

        Blob first, then the record with If-None-Match: a record always has its blob.
        """
        ident = kind.id_for(sha256)
        existing = self.find(kind, sha256)
        if existing is not None:
            return existing, False
        fields = {k: v for k, v in description.items() if k in kind.record.model_fields}
        record = kind.record(
            **fields, id=ident, sha256=sha256, bytes=size, filename=filename, created_at=utcnow()
        )
        metadata = {"sha256": sha256, **{f: str(getattr(record, f)) for f in kind.blob_metadata}}
        self._store.upload_file(kind.blob_key(ident), path, metadata=metadata)
        try:
            self._store.put(
                kind.record_key(ident), record.model_dump_json().encode(), if_none_match=True
            )
        except PreconditionFailed:  # a concurrent upload of the same bytes won
            return self.get(kind, ident), False
        return record, True

    def page(
        self, kind: UploadKind[RecordT], *, limit: int, after: str | None
    ) -> tuple[list[RecordT], str | None]:
        """Records in id order (content ids carry no time); ``after`` is the last id seen."""
        prefix = f"{kind.folder}/"
        out: list[RecordT] = []
        start = f"{prefix}{after}/~" if after else None
        keys = self._store.list_keys(prefix, start_after=start, limit=1000)
        for key in keys:
            if not key.endswith("/meta.json"):
                continue
            obj = self._store.get(key)
            if obj is None:
                continue
            out.append(kind.record.model_validate_json(obj.body))
            if len(out) >= limit:
                break
        next_cursor = out[-1].id if len(out) >= limit else None
        return out, next_cursor

    def delete(self, kind: UploadKind[Any], ident: str) -> None:
        self.get(kind, ident)
        self._store.delete_prefix(f"{kind.folder}/{ident}/")


__all__ = ["UploadStore"]
