"""``/v1/devices``: the catalogue of target profiles."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.engine.devices import get_device, list_devices
from service.engine.errors import EngineError
from service.errors import NotFound

bp = Blueprint("devices", __name__, url_prefix="/v1/devices")


@bp.get("")
def devices() -> Response:
    items = [d.model_dump(mode="json") for d in list_devices()]
    return jsonify({"items": items, "next_cursor": None})


@bp.get("/<name>")
def device(name: str) -> Response:
    try:
        profile = get_device(name)
    except EngineError as exc:
        raise NotFound(exc.message, code="device_not_found") from None
    return jsonify(profile.model_dump(mode="json"))
