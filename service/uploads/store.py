"""``UploadStore``: models and datasets, stored once by content hash.

Layout: ``models/<id>/source`` (the bytes as uploaded) + ``models/<id>/meta.json``;
``datasets/<id>/data.npz`` + ``datasets/<id>/meta.json``. The id is derived from the SHA-256,
so uploading the same bytes twice returns the same record. The blob is written before the
record, and the record with If-None-Match: a record that exists always has its blob.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from service.errors import NotFound, PreconditionFailed
from service.jobs.models import utcnow
from service.storage.s3 import ObjectStore


class ModelRecord(BaseModel):
    """An uploaded model as the API shows it."""

    id: str
    sha256: str
    bytes: int
    filename: str | None = None
    created_at: datetime
    format: str
    opset: int | None = None
    ir_version: int | None = None
    producer: str | None = None
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    parameter_count: int = 0
    node_count: int | None = None
    external_data: bool = False
    already_quantized: bool = False
    quantization: list[str] = Field(default_factory=list)
    op_types: dict[str, int] = Field(default_factory=dict)


class DatasetRecord(BaseModel):
    """An uploaded dataset (.npz keyed by input name, optional ``labels``)."""

    id: str
    sha256: str
    bytes: int
    filename: str | None = None
    created_at: datetime
    arrays: dict[str, dict[str, Any]] = Field(default_factory=dict)
    samples: int = 0
    has_labels: bool = False


RecordT = TypeVar("RecordT", ModelRecord, DatasetRecord)


def model_id_for(sha256: str) -> str:
    return "mdl_" + sha256[:32]


def dataset_id_for(sha256: str) -> str:
    return "ds_" + sha256[:32]


def model_source_key(model_id: str) -> str:
    return f"models/{model_id}/source"


def dataset_data_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/data.npz"


def _valid(prefix: str, ident: str) -> bool:
    body = ident[len(prefix) :]
    return (
        ident.startswith(prefix) and len(body) == 32 and all(c in "0123456789abcdef" for c in body)
    )


class UploadStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    # -- models ----------------------------------------------------------------------------
    def get_model(self, model_id: str) -> ModelRecord:
        return self._get("models", "mdl_", model_id, ModelRecord, "model")

    def find_model(self, sha256: str) -> ModelRecord | None:
        try:
            return self.get_model(model_id_for(sha256))
        except NotFound:
            return None

    def save_model(
        self,
        path: Path,
        *,
        sha256: str,
        size: int,
        filename: str | None,
        description: dict[str, Any],
    ) -> tuple[ModelRecord, bool]:
        """Store the file and its record; returns (record, created)."""
        model_id = model_id_for(sha256)
        return self._save(
            "models", "mdl_", model_id, ModelRecord, "model", model_source_key(model_id),
            path, sha256=sha256, size=size, filename=filename, description=description,
        )

    def list_models(self, *, limit: int, after: str | None) -> tuple[list[ModelRecord], str | None]:
        return self._list("models/", ModelRecord, limit, after)

    def delete_model(self, model_id: str) -> None:
        self.get_model(model_id)
        self._store.delete_prefix(f"models/{model_id}/")

    # -- datasets --------------------------------------------------------------------------
    def get_dataset(self, dataset_id: str) -> DatasetRecord:
        return self._get("datasets", "ds_", dataset_id, DatasetRecord, "dataset")

    def save_dataset(
        self,
        path: Path,
        *,
        sha256: str,
        size: int,
        filename: str | None,
        description: dict[str, Any],
    ) -> tuple[DatasetRecord, bool]:
        """Store the file and its record; returns (record, created)."""
        dataset_id = dataset_id_for(sha256)
        return self._save(
            "datasets", "ds_", dataset_id, DatasetRecord, "dataset", dataset_data_key(dataset_id),
            path, sha256=sha256, size=size, filename=filename, description=description,
        )

    def delete_dataset(self, dataset_id: str) -> None:
        self.get_dataset(dataset_id)
        self._store.delete_prefix(f"datasets/{dataset_id}/")

    # -- shared ----------------------------------------------------------------------------
    def _get(self, folder: str, id_prefix: str, ident: str, cls: type[RecordT], kind: str) -> RecordT:
        obj = self._store.get(f"{folder}/{ident}/meta.json") if _valid(id_prefix, ident) else None
        if obj is None:
            raise NotFound(f"{kind} {ident!r} not found", code=f"{kind}_not_found")
        return cls.model_validate_json(obj.body)

    def _save(
        self,
        folder: str,
        id_prefix: str,
        ident: str,
        cls: type[RecordT],
        kind: str,
        data_key: str,
        path: Path,
        *,
        sha256: str,
        size: int,
        filename: str | None,
        description: dict[str, Any],
    ) -> tuple[RecordT, bool]:
        """Blob first, then the record with If-None-Match: a record always has its blob."""
        try:
            return self._get(folder, id_prefix, ident, cls, kind), False
        except NotFound:
            pass
        fields = {k: v for k, v in description.items() if k in cls.model_fields}
        record = cls(
            **fields, id=ident, sha256=sha256, bytes=size, filename=filename, created_at=utcnow()
        )
        metadata = {"sha256": sha256}
        if isinstance(record, ModelRecord):
            metadata["format"] = record.format
        self._store.upload_file(data_key, path, metadata=metadata)
        try:
            self._store.put(
                f"{folder}/{ident}/meta.json", record.model_dump_json().encode(), if_none_match=True
            )
        except PreconditionFailed:  # a concurrent upload of the same bytes won
            return self._get(folder, id_prefix, ident, cls, kind), False
        return record, True

    # -- listing ---------------------------------------------------------------------------
    def _list(
        self, prefix: str, cls: type[Any], limit: int, after: str | None
    ) -> tuple[list[Any], str | None]:
        """Records in id order (content ids carry no time); ``after`` is the last id seen."""
        out: list[Any] = []
        start = f"{prefix}{after}/~" if after else None
        keys = self._store.list_keys(prefix, start_after=start, limit=1000)
        for key in keys:
            if not key.endswith("/meta.json"):
                continue
            obj = self._store.get(key)
            if obj is None:
                continue
            out.append(cls.model_validate_json(obj.body))
            if len(out) >= limit:
                break
        next_cursor = out[-1].id if len(out) >= limit else None
        return out, next_cursor
