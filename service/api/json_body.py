"""JSON request bodies: small and shallow.

Only the upload routes (``models.upload_model``, ``datasets.upload_dataset``) take bodies as
large as an upload; every other request body is capped at ``EDGEPRESS_MAX_JSON_BODY_BYTES``
(413 ``payload_too_large`` before it is read) and a JSON body nested deeper than
``EDGEPRESS_MAX_JSON_DEPTH`` is refused with 400 ``json_too_deep`` (the parser and the
validators recurse; a deep body must not reach them or end as a 500).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, request

from service.config import Settings
from service.errors import ServiceError, ValidationFailed

# Views that stream upload bodies to disk: they keep the upload limit.
UPLOAD_ENDPOINTS = frozenset({"models.upload_model", "datasets.upload_dataset"})


class JsonTooDeep(ServiceError):
    status, code = 400, "json_too_deep"


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def read_json_body(settings: Settings) -> Any:
    """The request's body parsed as JSON; ``ValidationFailed`` (422) when it is not JSON,
    ``JsonTooDeep`` (400) when it nests deeper than the limit."""
    raw = request.get_data(cache=True)  # capped by init_app's hook (413 beyond)
    if not request.is_json:
        raise ValidationFailed(
            "the body must be a JSON object (Content-Type: application/json)",
            extra={"errors": [{"field": "body", "message": "JSON object expected"}]},
        )
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep(settings) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ValidationFailed(
            "the body is not valid JSON",
            extra={"errors": [{"field": "body", "message": "JSON expected"}]},
        ) from None
    if json_depth_exceeds(body, settings.max_json_depth):
        raise _too_deep(settings)
    return body


def _too_deep(settings: Settings) -> JsonTooDeep:
    return JsonTooDeep(
        f"the JSON body nests deeper than {settings.max_json_depth} levels",
        extra={"limit": settings.max_json_depth},
    )


def init_app(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _cap_body() -> None:
        if request.endpoint not in UPLOAD_ENDPOINTS:
            # Werkzeug refuses a larger Content-Length at once, and stops a chunked body
            # when it passes the cap (413 either way).
            request.max_content_length = settings.max_json_body_bytes
