"""``/v1/uploads``: large models and datasets go straight to the object store.

``POST /v1/uploads`` returns a presigned POST (URL + form fields) whose policy caps the size;
the client sends the file there, then calls ``POST /v1/uploads/{id}/complete``, which checks
and stores it exactly like a direct upload (content addressed, inspected, quota counted) and
removes the temporary object. Unfinished uploads expire with their URL.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Literal

from flask import Blueprint, Response, jsonify, url_for
from pydantic import BaseModel, ConfigDict, Field

from service.api.context import services, space
from service.api.datasets import store_dataset
from service.api.idempotency import idempotent
from service.api.models import store_model
from service.api.schemas import parse_body
from service.api.streaming import clean_filename, receive_stored_object
from service.errors import NotFound
from service.jobs.models import utcnow

bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model", "dataset"] = Field(description="What the file is.")
    filename: str | None = Field(
        default=None, max_length=255, description="Its name (archives: .zip/.tar)."
    )


def _record_key(upload_id: str) -> str:
    return f"incoming/{upload_id}.json"


def _data_key(upload_id: str) -> str:
    return f"incoming/{upload_id}/data"


@bp.post("")
@idempotent
def create_upload() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    spec = parse_body(UploadCreate)
    upload_id = "upl_" + os.urandom(12).hex()
    max_bytes = (
        svc.settings.max_upload_bytes if spec.kind == "model" else svc.settings.max_dataset_bytes
    )
    ttl = svc.settings.presign_ttl_seconds
    post = space().store.presign_post(_data_key(upload_id), max_bytes=max_bytes, ttl=ttl)
    expires = utcnow() + timedelta(seconds=ttl)
    record = {
        "id": upload_id,
        "kind": spec.kind,
        "filename": clean_filename(spec.filename),
        "expires_at": expires.isoformat(),
        "max_bytes": max_bytes,
    }
    space().store.put(_record_key(upload_id), json.dumps(record).encode(), if_none_match=True)
    complete = url_for("uploads.complete_upload", upload_id=upload_id)
    out = {**record, "url": post["url"], "fields": post["fields"], "complete_url": complete}
    return jsonify(out), 201, {"Location": complete}


@bp.post("/<upload_id>/complete")
def complete_upload(upload_id: str) -> Response:
    svc = services()
    obj = (
        space().store.get(_record_key(upload_id))
        if upload_id.startswith("upl_") and len(upload_id) == 28
        else None
    )
    if obj is None:
        raise NotFound(f"upload {upload_id!r} not found", code="upload_not_found")
    record = json.loads(obj.body)
    with receive_stored_object(
        space().store,
        _data_key(upload_id),
        max_bytes=record["max_bytes"],
        scratch_dir=svc.settings.scratch_dir,
        filename=record.get("filename"),
    ) as received:
        resp = store_model(received) if record["kind"] == "model" else store_dataset(received)
    if resp.status_code < 300:
        space().store.delete_prefix(f"incoming/{upload_id}")
    return resp
