"""RFC 9457 problem+json rendering: one handler for the whole ``ServiceError`` family.

Only 5xx are logged with a traceback; messages are the client's (no paths, no secrets).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, json, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from service.engine.errors import EngineError
from service.errors import ServiceError, ValidationFailed

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# Engine error codes met while inspecting uploads or validating recipes, and their statuses.
ENGINE_STATUS = {
    "not_onnx": 415,
    "unsafe_format": 415,
    "model_too_large": 413,
    "unknown_pass": 422,
    "invalid_recipe": 422,
}


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"https://edgepress.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.path if request else None,
    }
    body.update(extra or {})
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def from_engine_error(exc: EngineError, default_status: int = 422) -> ServiceError:
    """Translate an engine error met in the API into a ``ServiceError``."""
    status = ENGINE_STATUS.get(exc.code, default_status)
    extra: dict[str, Any] = {"details": exc.details} if exc.details else {}
    if exc.code == "invalid_recipe" and exc.details.get("errors"):
        extra["errors"] = [
            {"field": f"recipe[{exc.details.get('step', 0)}].{e['field']}", "message": e["message"]}
            for e in exc.details["errors"]
        ]
    return ServiceError(exc.message, code=exc.code, status=status, extra=extra)


def from_validation_error(exc: ValidationError) -> ValidationFailed:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
        for e in exc.errors()
    ]
    first = errors[0]["field"] if errors else "body"
    return ValidationFailed(
        f"invalid request: {first}: {errors[0]['message'] if errors else 'invalid'}",
        code="validation_error",
        extra={"errors": errors},
    )


def render_service_error(exc: ServiceError) -> Response:
    if exc.status >= 500:
        log.error("server error %s: %s", exc.code, exc.message)
    return problem(exc.status, exc.code, _title(exc.status), exc.message, exc.extra, exc.headers)


def init_app(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Response:
        return render_service_error(exc)

    @app.errorhandler(EngineError)
    def _engine_error(exc: EngineError) -> Response:
        return _service_error(from_engine_error(exc))

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        return _service_error(from_validation_error(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            400: "bad_request",
            415: "unsupported_media_type",
        }.get(status, "http_error")
        detail = exc.description or exc.name
        if status == 404:
            detail = "no such resource"
        elif status == 413:
            detail = "the request body is larger than this server accepts"
        # Keep the exception's own headers (Allow on 405, for one).
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return problem(status, code, exc.name, detail, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem(
            500,
            "internal_error",
            "Internal server error",
            "an unexpected error occurred; it has been logged",
        )
