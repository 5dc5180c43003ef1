"""``/v1/models``: upload (raw body or multipart), describe, list, delete."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from service.api.context import services, space
from service.api.idempotency import remember, replay
from service.api.inspection import inspect_in_child
from service.api.pagination import page_cursor, page_limit
from service.api.problems import from_engine_error
from service.api.quotas import check_storage_quota
from service.api.streaming import ReceivedFile, receive_upload
from service.engine.errors import EngineError
from service.uploads.records import MODEL

bp = Blueprint("models", __name__, url_prefix="/v1/models")


@bp.post("")
def upload_model() -> Response:
    """Stream a model (``.onnx``, or a ``.zip``/``.tar`` with ONNX + external data) to the store.

    Answers 201 with the model resource, or 200 with the existing one for bytes already stored.
    """
    svc = services()
    with receive_upload(
        request, max_bytes=svc.settings.max_upload_bytes, scratch_dir=svc.settings.scratch_dir
    ) as received:
        return store_model(received)


def store_model(received: ReceivedFile) -> Response:
    """Describe and store a received model file (direct upload or presigned-POST upload)."""
    svc = services()
    limits = svc.settings.engine_limits()
    svc.metrics.uploads_bytes.labels("model").inc(received.size)
    replayed = replay(f"model:{received.sha256}")
    if replayed is not None:
        return replayed
    existing = space().uploads.find_model(received.sha256)
    if existing is not None:
        record, created = existing, False
    else:
        check_storage_quota(received.size)
        try:
            description = inspect_in_child(
                MODEL, received.path, received.filename, limits, svc.settings
            )
        except EngineError as exc:
            raise from_engine_error(exc) from None
        record, created = space().uploads.save_model(
            received.path,
            sha256=received.sha256,
            size=received.size,
            filename=received.filename,
            description=description,
        )
    location = url_for("models.get_model", model_id=record.id)
    resp = jsonify(record.model_dump(mode="json"))
    resp.status_code, resp.headers["Location"] = (201 if created else 200), location
    return remember(f"model:{received.sha256}", resp)


@bp.get("/<model_id>")
def get_model(model_id: str) -> Response:
    return jsonify(space().uploads.get_model(model_id).model_dump(mode="json"))


@bp.get("")
def list_models() -> Response:
    items, cursor = space().uploads.list_models(limit=page_limit(), after=page_cursor())
    return jsonify({"items": [m.model_dump(mode="json") for m in items], "next_cursor": cursor})


@bp.delete("/<model_id>")
def delete_model(model_id: str) -> tuple[str, int]:
    space().uploads.delete_model(model_id)
    return "", 204
