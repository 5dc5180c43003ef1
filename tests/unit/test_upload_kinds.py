"""The table of upload kinds drives both kinds: ids, store layout, size limits, problem codes,
the inspector, the routes and the presigned ``kind``, with no branch on a kind's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from flask import Flask

from service.config import Settings
from service.errors import NotFound
from service.storage.s3 import StoredObject
from service.uploads.records import (
    DATASET,
    MODEL,
    UPLOAD_KINDS,
    DatasetRecord,
    ModelRecord,
    UploadKind,
    dataset_id_for,
    model_id_for,
)
from service.uploads.store import UploadStore
from tests.models import mlp

SHA = "0123456789abcdef" * 4


class MemoryStore:
    """The part of ``ObjectStore`` that ``UploadStore`` uses, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, StoredObject] = {}

    def get(self, key: str) -> StoredObject | None:
        return self.objects.get(key)

    def put(self, key: str, body: bytes, *, if_none_match: bool = False, **_: Any) -> str:
        assert not (if_none_match and key in self.objects)
        self.objects[key] = StoredObject(key, body, "etag", {})
        return "etag"

    def upload_file(self, key: str, path: Path, *, metadata: dict[str, str] | None = None,
                    **_: Any) -> None:
        self.objects[key] = StoredObject(key, path.read_bytes(), "etag", dict(metadata or {}))

    def list_keys(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[str]:
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        return [k for k in keys if start_after is None or k > start_after][:limit]

    def delete_prefix(self, prefix: str) -> int:
        gone = [k for k in self.objects if k.startswith(prefix)]
        for key in gone:
            del self.objects[key]
        return len(gone)


def test_the_table_holds_both_kinds() -> None:
    assert UPLOAD_KINDS == {"model": MODEL, "dataset": DATASET}
    assert (MODEL.record, DATASET.record) == (ModelRecord, DatasetRecord)
    # The layout the worker reads (models/<id>/source, datasets/<id>/data.npz) and the ids the
    # client computes locally come from the table.
    assert model_id_for(SHA) == MODEL.id_for(SHA) == "mdl_" + SHA[:32]
    assert dataset_id_for(SHA) == DATASET.id_for(SHA) == "ds_" + SHA[:32]
    assert MODEL.blob_key("mdl_1") == "models/mdl_1/source"
    assert DATASET.blob_key("ds_1") == "datasets/ds_1/data.npz"
    assert (MODEL.invalid_code, DATASET.invalid_code) == ("invalid_model", "invalid_dataset")
    assert (MODEL.not_found_code, DATASET.not_found_code) == ("model_not_found", "dataset_not_found")
    assert (MODEL.out_of_memory_code, DATASET.out_of_memory_code) == ("model_too_large", "invalid_dataset")
    # Each kind's limit is its own setting.
    settings = Settings(max_upload_bytes=4096, max_dataset_bytes=2048)
    assert (MODEL.size_limit(settings), DATASET.size_limit(settings)) == (4096, 2048)


def test_the_table_needs_neither_flask_nor_boto3() -> None:
    code = (
        "import sys\n"
        "import service.uploads\n"
        "from service.uploads.records import UPLOAD_KINDS, DatasetRecord, ModelRecord\n"
        "print(','.join(m for m in ('flask', 'boto3', 'botocore') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_presigned_kinds_are_the_table() -> None:
    from service.api.uploads import UploadCreate

    assert set(get_args(UploadCreate.model_fields["kind"].annotation)) == set(UPLOAD_KINDS)


@pytest.mark.parametrize("kind", UPLOAD_KINDS.values(), ids=list(UPLOAD_KINDS))
def test_every_kind_gets_the_same_routes(kind: UploadKind[Any]) -> None:
    from service.api.uploads import upload_blueprint

    app = Flask(__name__)
    app.register_blueprint(upload_blueprint(kind, __name__))
    routes = {(r.rule, r.endpoint, m) for r in app.url_map.iter_rules()
              for m in r.methods - {"HEAD", "OPTIONS"} if r.endpoint != "static"}
    base, item = f"/v1/{kind.folder}", f"/v1/{kind.folder}/<{kind.name}_id>"
    assert routes == {
        (base, f"{kind.folder}.upload_{kind.name}", "POST"),
        (base, f"{kind.folder}.list_{kind.folder}", "GET"),
        (item, f"{kind.folder}.get_{kind.name}", "GET"),
        (item, f"{kind.folder}.delete_{kind.name}", "DELETE"),
    }


def _description(kind: UploadKind[Any], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A real file of the kind and the description its inspector gives."""
    if kind is MODEL:
        path = tmp_path / "m.onnx"
        path.write_bytes(mlp(inputs=4, hidden=4).SerializeToString())
    else:
        path = tmp_path / "d.npz"
        np.savez(path, x=np.zeros((3, 4), np.float32))
    from service.engine.limits import EngineLimits

    return path, kind.inspector(path, path.name, EngineLimits())


@pytest.mark.parametrize("kind", UPLOAD_KINDS.values(), ids=list(UPLOAD_KINDS))
def test_one_store_path_for_every_kind(kind: UploadKind[Any], tmp_path: Path) -> None:
    path, description = _description(kind, tmp_path)
    memory = MemoryStore()
    uploads = UploadStore(memory)  # type: ignore[arg-type]
    record, created = uploads.save(kind, path, sha256=SHA, size=path.stat().st_size,
                                   filename=path.name, description=description)
    assert created and isinstance(record, kind.record) and record.id == kind.id_for(SHA)
    blob = memory.objects[kind.blob_key(record.id)]
    assert blob.body == path.read_bytes()
    assert blob.metadata == {"sha256": SHA, **{f: str(getattr(record, f)) for f in kind.blob_metadata}}
    assert kind.record.model_validate_json(memory.objects[kind.record_key(record.id)].body) == record
    # Same bytes again: the stored record, nothing written.
    before = dict(memory.objects)
    again, created = uploads.save(kind, path, sha256=SHA, size=1, filename=None, description={})
    assert (again, created) == (record, False) and memory.objects == before
    assert uploads.find(kind, SHA) == uploads.get(kind, record.id) == record
    assert uploads.page(kind, limit=10, after=None) == ([record], None)
    # The other kind does not see it.
    (other,) = [k for k in UPLOAD_KINDS.values() if k is not kind]
    assert uploads.find(other, SHA) is None
    assert uploads.page(other, limit=10, after=None) == ([], None)
    uploads.delete(kind, record.id)
    assert memory.objects == {}
    for missing in (record.id, "nope"):
        with pytest.raises(NotFound) as info:
            uploads.get(kind, missing)
        assert info.value.code == kind.not_found_code
