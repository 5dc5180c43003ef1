"""Query parameters shared by the list endpoints."""

from __future__ import annotations

from flask import request

from service.errors import ValidationFailed


def page_cursor(max_length: int = 512) -> str | None:
    """The opaque ``cursor`` query parameter (None when absent or empty)."""
    raw = request.args.get("cursor") or None
    if raw is not None and len(raw) > max_length:
        raise ValidationFailed(
            "invalid cursor", code="invalid_cursor",
            extra={"errors": [{"field": "cursor", "message": f"at most {max_length} characters"}]},
        )
    return raw


def page_limit(default: int = 20, maximum: int = 100) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= maximum:
        raise ValidationFailed(
            f"limit must be an integer from 1 to {maximum}",
            code="validation_error",
            extra={"errors": [{"field": "limit", "message": f"1..{maximum}"}]},
        )
    return value
