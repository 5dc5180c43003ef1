"""``/v1/devices``: the catalogue of target profiles."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.engine.devices import get_device, list_devices

bp = Blueprint("devices", __name__, url_prefix="/v1/devices")


@bp.get("")
def devices() -> Response:
    items = [d.model_dump(mode="json") for d in list_devices()]
    return jsonify({"items": items, "next_cursor": None})


@bp.get("/<name>")
def device(name: str) -> Response:
    return jsonify(get_device(name).model_dump(mode="json"))
