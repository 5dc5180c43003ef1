"""``/v1/datasets``: ``.npz`` calibration / evaluation samples keyed by model input name."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from service.api.context import services, space
from service.api.idempotency import remember, replay
from service.api.inspection import inspect_in_child
from service.api.problems import from_engine_error
from service.api.quotas import check_storage_quota
from service.api.streaming import ReceivedFile, receive_upload
from service.engine.errors import EngineError
from service.uploads.records import DATASET

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")


@bp.post("")
def upload_dataset() -> Response:
    """Store an ``.npz`` (read with ``allow_pickle=False`` only). Validated against a model's
    inputs when a job uses it."""
    svc = services()
    with receive_upload(
        request, max_bytes=svc.settings.max_dataset_bytes, scratch_dir=svc.settings.scratch_dir
    ) as received:
        return store_dataset(received)


def store_dataset(received: ReceivedFile) -> Response:
    """Validate and store a received dataset file (direct or presigned-POST upload)."""
    svc = services()
    limits = svc.settings.engine_limits()
    svc.metrics.uploads_bytes.labels("dataset").inc(received.size)
    replayed = replay(f"dataset:{received.sha256}")
    if replayed is not None:
        return replayed
    check_storage_quota(received.size)
    try:
        description = inspect_in_child(
            DATASET, received.path, received.filename, limits, svc.settings
        )
    except EngineError as exc:
        raise from_engine_error(exc) from None
    record, created = space().uploads.save_dataset(
        received.path,
        sha256=received.sha256,
        size=received.size,
        filename=received.filename,
        description=description,
    )
    location = url_for("datasets.get_dataset", dataset_id=record.id)
    resp = jsonify(record.model_dump(mode="json"))
    resp.status_code, resp.headers["Location"] = (201 if created else 200), location
    return remember(f"dataset:{received.sha256}", resp)


@bp.get("/<dataset_id>")
def get_dataset(dataset_id: str) -> Response:
    return jsonify(space().uploads.get_dataset(dataset_id).model_dump(mode="json"))


@bp.delete("/<dataset_id>")
def delete_dataset(dataset_id: str) -> tuple[str, int]:
    space().uploads.delete_dataset(dataset_id)
    return "", 204
