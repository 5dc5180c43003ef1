"""The service's error family: one exception type with a stable code and an HTTP status.

The API renders every ``ServiceError`` as RFC 9457 problem+json (``service.api.problems``).
Engine errors (``service.engine.EngineError``) are translated where the API calls the engine.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error the client can act on. ``code`` is stable; ``message`` is for humans."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra or {}
        self.headers = headers or {}


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class ValidationFailed(ServiceError):
    status, code = 422, "validation_error"


class UnsupportedMedia(ServiceError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class Unavailable(ServiceError):
    """A dependency (object store, broker) cannot be reached; the client should retry."""

    status, code = 503, "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class PreconditionFailed(ServiceError):
    """A conditional write lost a race (someone else changed the object first)."""

    status, code = 412, "precondition_failed"
