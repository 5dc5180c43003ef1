"""The one upload path, for every kind in ``service.uploads.records.UPLOAD_KINDS``.

``upload_blueprint(kind)`` serves ``/v1/<folder>`` (``/v1/models``, ``/v1/datasets``): upload (raw
body or multipart), list, describe, delete. ``store_upload`` is what every upload goes through,
direct or presigned: bytes already stored answer 200 with their record; new bytes are counted
against the quota once and inspected once, in a child process, before their record is written.

``/v1/uploads``: large models and datasets go straight to the object store. ``POST /v1/uploads``
returns a presigned POST (URL + form fields) whose policy caps the size; the client sends the
file there, then calls ``POST /v1/uploads/{id}/complete``, which checks and stores it exactly
like a direct upload (``store_upload``) and removes the temporary object. Unfinished uploads
expire with their URL.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field

from service.api.context import services, space
from service.api.idempotency import idempotent, remember, replay
from service.api.inspection import inspect_in_child
from service.api.pagination import page_cursor, page_limit
from service.api.problems import from_engine_error
from service.api.quotas import check_storage_quota
from service.api.schemas import parse_body
from service.api.streaming import (
    ReceivedFile,
    clean_filename,
    receive_stored_object,
    receive_upload,
)
from service.config import limits_for
from service.engine.errors import EngineError
from service.errors import NotFound
from service.jobs.record import utcnow
from service.uploads import incoming
from service.uploads.records import UPLOAD_KINDS, UploadKind


def store_upload(
    kind: UploadKind[Any], received: ReceivedFile, completing: str | None = None
) -> Response:
    """Describe and store a received file (direct upload, or the presigned upload
    ``completing``, whose data is already in the store)."""
    svc = services()
    svc.metrics.uploads_bytes.labels(kind.name).inc(received.size)
    scope = f"{kind.name}:{received.sha256}"
    replayed = replay(scope)
    if replayed is not None:
        return replayed
    uploads = space().uploads
    existing = uploads.find(kind, received.sha256)
    if existing is not None:
        record, created = existing, False
    else:
        # A completed upload's data is in incoming/ already (counted): only its copy is new.
        check_storage_quota(received.size, completing=completing)
        try:
            description = inspect_in_child(
                kind, received.path, received.filename, limits_for(svc.settings).engine,
                svc.settings, svc.inspections,
            )
        except EngineError as exc:
            raise from_engine_error(exc) from None
        record, created = uploads.save(
            kind,
            received.path,
            sha256=received.sha256,
            size=received.size,
            filename=received.filename,
            description=description,
        )
    location = url_for(f"{kind.folder}.get_{kind.name}", **{f"{kind.name}_id": record.id})
    resp = jsonify(record.model_dump(mode="json"))
    resp.status_code, resp.headers["Location"] = (201 if created else 200), location
    return remember(scope, resp)


def upload_blueprint(kind: UploadKind[Any], import_name: str) -> Blueprint:
    """``/v1/<folder>`` for one kind; endpoints ``<folder>.upload_<name>``, ``list_<folder>``,
    ``get_<name>`` and ``delete_<name>``, with the id as ``<name>_id``."""
    bp = Blueprint(kind.folder, import_name, url_prefix=f"/v1/{kind.folder}")
    id_rule = f"/<{kind.name}_id>"

    def upload() -> Response:
        """Stream the file to the store: 201 with its record, 200 for bytes already stored."""
        svc = services()
        with receive_upload(
            request, max_bytes=kind.size_limit(svc.settings), scratch_dir=svc.settings.scratch_dir
        ) as received:
            return store_upload(kind, received)

    def listing() -> Response:
        items, cursor = space().uploads.page(kind, limit=page_limit(), after=page_cursor())
        return jsonify({"items": [r.model_dump(mode="json") for r in items], "next_cursor": cursor})

    def describe(**ident: str) -> Response:
        record = space().uploads.get(kind, ident[f"{kind.name}_id"])
        return jsonify(record.model_dump(mode="json"))

    def delete(**ident: str) -> tuple[str, int]:
        space().uploads.delete(kind, ident[f"{kind.name}_id"])
        return "", 204

    bp.add_url_rule("", f"upload_{kind.name}", upload, methods=["POST"])
    bp.add_url_rule("", f"list_{kind.folder}", listing, methods=["GET"])
    bp.add_url_rule(id_rule, f"get_{kind.name}", describe, methods=["GET"])
    bp.add_url_rule(id_rule, f"delete_{kind.name}", delete, methods=["DELETE"])
    return bp


# -- presigned uploads: /v1/uploads ----------------------------------------------------------
bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model", "dataset"] = Field(description="What the file is.")
    filename: str | None = Field(
        default=None, max_length=255, description="Its name (archives: .zip/.tar)."
    )


_record_key, _data_key = incoming.record_key, incoming.data_key


@bp.post("")
@idempotent
def create_upload() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    spec = parse_body(UploadCreate)
    upload_id = "upl_" + os.urandom(12).hex()
    max_bytes = UPLOAD_KINDS[spec.kind].size_limit(svc.settings)
    check_storage_quota(max_bytes)  # a pending upload reserves its size limit
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
        resp = store_upload(UPLOAD_KINDS[record["kind"]], received, completing=upload_id)
    if resp.status_code < 300:
        space().store.delete_prefix(f"incoming/{upload_id}")
    return resp
