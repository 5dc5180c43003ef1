"""``/healthz`` (process alive), ``/readyz`` (store and broker reachable), ``/metrics``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.api.context import services
from service.errors import Unavailable
from service.metrics import QueueDepthCollector

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    svc = services()
    checks: dict[str, str] = {}
    for name, ping in (("store", svc.root_store.ping), ("broker", svc.queue.ping)):
        try:
            ping()
            checks[name] = "ok"
        except Unavailable:
            checks[name] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    body = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    if ready:
        return body
    return body, 503, {"Retry-After": "5"}


@bp.get("/metrics")
def metrics() -> Response:
    svc = services()
    payload, content_type = svc.metrics.render([QueueDepthCollector(svc.queue.depth)])
    return Response(payload, content_type=content_type)
