"""What an upload is, importable with pydantic alone (no flask, no boto3): the record types,
their content ids, and ``UPLOAD_KINDS``, the table of upload kinds.

Everything that tells a model from a dataset (id prefix, record type, size limit, inspector,
storage layout, problem codes) is one ``UploadKind`` row; the store, the API's views and the
inspection child look the kind up here instead of branching on its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from service.config import Settings
    from service.engine.limits import EngineLimits


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
    # weights kept in external data files (past the engine's inline limit): the job streams
    # them, and its model comes as model.onnx + model.onnx.data
    external_data_kept_bytes: int = 0
    already_quantized: bool = False
    quantization: list[str] = Field(default_factory=list)
    op_types: dict[str, int] = Field(default_factory=dict)
    # A causal decoder: its token-ids input and the inputs made from the ids (a token dataset
    # may hold ``input_ids`` alone); None for other models.
    decoder: dict[str, Any] | None = None


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

# (path, filename, limits) -> the engine's description of the file, or EngineError.
Inspector = Callable[[Path, "str | None", "EngineLimits"], dict[str, Any]]


def _inspect_model(path: Path, filename: str | None, limits: EngineLimits) -> dict[str, Any]:
    from service.engine.ingest import inspect_upload

    return dict(inspect_upload(path, filename, limits))


def _inspect_dataset(path: Path, filename: str | None, limits: EngineLimits) -> dict[str, Any]:
    from service.engine.dataset import inspect_dataset

    return dict(inspect_dataset(path, limits))


@dataclass(frozen=True)
class UploadKind(Generic[RecordT]):
    """One kind of upload: how it is named, checked, limited and laid out in the store.

    Stored as ``<folder>/<id>/<blob>`` (the bytes as uploaded) + ``<folder>/<id>/meta.json``
    (the record); the id is ``id_prefix`` + the first 32 hex digits of the SHA-256.
    """

    name: str  # "model": problem codes, metrics label, idempotency scope, presigned ``kind``
    folder: str  # "models": the store folder and the API collection (/v1/<folder>)
    id_prefix: str
    record: type[RecordT]
    blob: str  # the uploaded bytes' name inside <folder>/<id>/
    inspector: Inspector  # run in the inspection child (service.api.inspect_child)
    out_of_memory_code: str  # the refusal when inspecting needs more memory than allowed
    blob_metadata: tuple[str, ...] = ()  # record fields also written as the blob's metadata

    def size_limit(self, settings: Settings) -> int:
        """The largest accepted upload of this kind (``limits_for(settings).upload_bytes``)."""
        from service.config import limits_for

        return limits_for(settings).upload_bytes[self.name]

    def id_for(self, sha256: str) -> str:
        return self.id_prefix + sha256[:32]

    def is_id(self, ident: str) -> bool:
        body = ident[len(self.id_prefix) :]
        return (
            ident.startswith(self.id_prefix)
            and len(body) == 32
            and all(c in "0123456789abcdef" for c in body)
        )

    def blob_key(self, ident: str) -> str:
        return f"{self.folder}/{ident}/{self.blob}"

    def record_key(self, ident: str) -> str:
        return f"{self.folder}/{ident}/meta.json"

    @property
    def invalid_code(self) -> str:
        """The refusal of a file that is not a valid upload of this kind."""
        return f"invalid_{self.name}"

    @property
    def not_found_code(self) -> str:
        return f"{self.name}_not_found"


MODEL: UploadKind[ModelRecord] = UploadKind(
    name="model",
    folder="models",
    id_prefix="mdl_",
    record=ModelRecord,
    blob="source",
    inspector=_inspect_model,
    out_of_memory_code="model_too_large",
    blob_metadata=("format",),
)
DATASET: UploadKind[DatasetRecord] = UploadKind(
    name="dataset",
    folder="datasets",
    id_prefix="ds_",
    record=DatasetRecord,
    blob="data.npz",
    inspector=_inspect_dataset,
    out_of_memory_code="invalid_dataset",
)
UPLOAD_KINDS: dict[str, UploadKind[Any]] = {kind.name: kind for kind in (MODEL, DATASET)}


def model_id_for(sha256: str) -> str:
    return MODEL.id_for(sha256)


def dataset_id_for(sha256: str) -> str:
    return DATASET.id_for(sha256)


__all__ = [
    "DATASET",
    "MODEL",
    "UPLOAD_KINDS",
    "DatasetRecord",
    "ModelRecord",
    "RecordT",
    "UploadKind",
    "dataset_id_for",
    "model_id_for",
]
