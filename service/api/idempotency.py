"""``Idempotency-Key`` on every POST: a retried request gets the original response.

The same key with the same request (method, path, body) replays the stored response; the same
key with another request is 409 ``idempotency_key_reused``; a request still in flight under the
key is 409 ``idempotency_in_progress`` with Retry-After. Records live in the tenant's space
(``idempotency/<sha256(key)>.json``) with conditional writes, so replicas agree. Responses
with a 5xx status are not remembered: the client may retry them.

JSON endpoints are wrapped whole (``@idempotent``). Uploads stream first, so their fingerprint
(the content hash) is known only mid-request: they call ``replay`` and ``remember``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flask import Response, current_app, request
from flask.typing import ResponseReturnValue

from service.api.context import services, space
from service.errors import Conflict, PreconditionFailed, ServiceError
from service.jobs.record import utcnow

HEADER = "Idempotency-Key"
_KEEP_HEADERS = ("Location",)


def _key() -> str | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not 1 <= len(raw) <= 255:
        raise ServiceError("Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key", status=400)
    return raw


def _record_key(key: str) -> str:
    return f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"


def _fresh(record: dict[str, Any]) -> bool:
    created = datetime.fromisoformat(record["created_at"])
    return (utcnow() - created).total_seconds() < services().settings.idempotency_ttl_seconds


def _replay_response(record: dict[str, Any]) -> Response:
    resp = Response(record["body"], status=record["status"], mimetype=record["mimetype"])
    for name, value in record.get("headers", {}).items():
        resp.headers[name] = value
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _conflict_or_replay(record: dict[str, Any], fingerprint: str) -> Response:
    if record["fingerprint"] != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request", code="idempotency_key_reused"
        )
    if record["state"] == "pending":
        raise ServiceError(
            "a request with this Idempotency-Key is still in progress", code="idempotency_in_progress",
            status=409, headers={"Retry-After": "1"},
        )
    return _replay_response(record)


def _to_response(result: ResponseReturnValue) -> Response:
    return current_app.make_response(result)


def _store_completed(key: str, fingerprint: str, resp: Response, etag: str | None) -> None:
    store = space().store
    if resp.status_code >= 500:
        store.delete(_record_key(key))
        return
    record = {
        "state": "complete", "fingerprint": fingerprint, "created_at": utcnow().isoformat(),
        "status": resp.status_code, "mimetype": resp.mimetype, "body": resp.get_data(as_text=True),
        "headers": {h: resp.headers[h] for h in _KEEP_HEADERS if h in resp.headers},
    }
    data = json.dumps(record).encode()
    try:
        if etag is None:
            store.put(_record_key(key), data, if_none_match=True)
        else:
            store.put(_record_key(key), data, if_match=etag)
    except PreconditionFailed:
        pass  # a concurrent identical request stored the same outcome first


def idempotent(view: Callable[..., ResponseReturnValue]) -> Callable[..., Response]:
    """Wrap a JSON POST view: the fingerprint is the method, path and raw body."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        key = _key()
        if key is None:
            return _to_response(view(*args, **kwargs))
        body = request.get_data(cache=True)
        fingerprint = hashlib.sha256(
            request.method.encode() + b" " + request.path.encode() + b"\n" + body
        ).hexdigest()
        store = space().store
        pending = json.dumps({"state": "pending", "fingerprint": fingerprint,
                              "created_at": utcnow().isoformat()}).encode()
        try:
            etag = store.put(_record_key(key), pending, if_none_match=True)
        except PreconditionFailed:
            existing = store.get(_record_key(key))
            if existing is not None:
                record = json.loads(existing.body)
                if _fresh(record):
                    return _conflict_or_replay(record, fingerprint)
                etag = store.put(_record_key(key), pending, if_match=existing.etag)
            else:
                etag = store.put(_record_key(key), pending, if_none_match=True)
        try:
            resp = _to_response(view(*args, **kwargs))
        except Exception as exc:  # rendered by the app's handlers, then remembered (<500)
            resp = _to_response(current_app.handle_user_exception(exc))
        _store_completed(key, fingerprint, resp, etag)
        return resp

    return wrapper


def replay(fingerprint: str) -> Response | None:
    """For uploads: the stored response for this key and content, 409 for other content, or
    None when the key is new (or absent)."""
    key = _key()
    if key is None:
        return None
    existing = space().store.get(_record_key(key))
    if existing is None:
        return None
    record = json.loads(existing.body)
    if not _fresh(record):
        return None
    return _conflict_or_replay(record, fingerprint)


def remember(fingerprint: str, resp: Response) -> Response:
    key = _key()
    if key is not None:
        existing = space().store.get(_record_key(key))
        _store_completed(key, fingerprint, resp, existing.etag if existing else None)
    return resp
