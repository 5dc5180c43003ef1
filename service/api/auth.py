"""API keys, tenants and per-key rate limits.

Keys are kept only as SHA-256 digests (from ``EDGEPRESS_API_KEYS_FILE``, or hashed at start-up
from ``EDGEPRESS_API_KEYS``). Each key belongs to a tenant; a tenant's models, datasets, jobs
and artifacts live under ``tenants/<tenant>/`` in the store, so another tenant's id answers
404 exactly like an id that does not exist. Rate limits are fixed one-minute windows counted in
the broker's Redis, so they hold across API replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from flask import Flask, g, request

from service.config import Settings
from service.errors import ServiceError, Unavailable
from service.tenants import DEFAULT_TENANT, TENANT_NAME

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class ApiKey:
    tenant: str
    name: str
    digest: str  # sha256 hex of the key


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="edgepress"'})


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(settings: Settings) -> dict[str, ApiKey]:
    """Digest -> key, from the settings. Raises ValueError on a malformed configuration.

    A key source that is set must hold at least one key: ``EDGEPRESS_API_KEYS=""`` or a keys
    file of ``[]`` is an operator's mistake, never a way to open the API.
    """
    keys: dict[str, ApiKey] = {}
    if settings.api_keys is not None:
        items = [i.strip() for i in settings.api_keys.get_secret_value().split(",") if i.strip()]
        if not items:
            raise ValueError("EDGEPRESS_API_KEYS is set but holds no key")
        for i, item in enumerate(items):
            tenant, sep, key = item.partition(":")
            if not sep or not key or not TENANT_NAME.fullmatch(tenant):
                raise ValueError(f'EDGEPRESS_API_KEYS entry {i} must be "tenant:key"')
            keys[digest(key)] = ApiKey(tenant, f"env-{i}", digest(key))
    if settings.api_keys_file is not None:
        if not settings.api_keys_file.strip():
            raise ValueError("EDGEPRESS_API_KEYS_FILE is set but names no file")
        try:
            entries = json.loads(Path(settings.api_keys_file).read_text())
        except OSError as exc:
            raise ValueError(f"api keys file cannot be read: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"api keys file is not valid JSON (line {exc.lineno})") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError("api keys file must be a non-empty JSON list")
        for entry in entries:
            if not isinstance(entry, dict) or "tenant" not in entry or "sha256" not in entry:
                raise ValueError('api keys file: each entry is {"tenant", "name", "sha256"}')
            tenant, sha = str(entry["tenant"]), str(entry["sha256"]).lower()
            if not TENANT_NAME.fullmatch(tenant) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError("api keys file: each entry needs a valid tenant and sha256")
            keys[sha] = ApiKey(tenant, str(entry.get("name", sha[:8])), sha)
    return keys


def check_auth_mode(settings: Settings, keys: dict[str, ApiKey]) -> None:
    """Fail closed: no keys is a start-up error unless the operator chose ``EDGEPRESS_AUTH=open``
    (and "open" with keys configured is refused too: the operator must mean one of them)."""
    if settings.auth == "open" and keys:
        raise ValueError("EDGEPRESS_AUTH=open but API keys are configured: choose one")
    if settings.auth == "keys" and not keys:
        raise ValueError(
            "no API keys configured (EDGEPRESS_API_KEYS_FILE or EDGEPRESS_API_KEYS): the API "
            "refuses to start open; set EDGEPRESS_AUTH=open to run without authentication"
        )


class RateLimiter:
    """Fixed-window counter per key in Redis (shared by every API replica).

    It fails closed: when Redis cannot count, the request is refused with 503 (and
    ``Retry-After``) rather than let through unlimited.
    """

    def __init__(self, redis_url: str, per_minute: int) -> None:
        import redis

        self.per_minute = per_minute
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)

    def check(self, key_id: str) -> None:
        window = int(time.time() // 60)
        name = f"edgepress:ratelimit:{key_id}:{window}"
        try:
            pipe = self._redis.pipeline()
            pipe.incr(name)
            pipe.expire(name, 120)
            count = int(pipe.execute()[0])
        except Exception as exc:  # redis-py raises several families (connection, timeout, auth)
            log.warning("rate limiter unavailable: %s", exc)
            raise Unavailable(
                "the rate limiter is unavailable; retry shortly", code="rate_limiter_unavailable"
            ) from None
        if count > self.per_minute:
            retry = 60 - int(time.time()) % 60
            raise RateLimited(
                f"rate limit of {self.per_minute} requests per minute exceeded",
                headers={"Retry-After": str(max(1, retry))},
            )


def init_app(app: Flask, settings: Settings) -> None:
    keys = load_keys(settings)
    check_auth_mode(settings, keys)
    limiter = None
    if settings.rate_limit_per_minute and settings.broker_url.startswith(("redis://", "rediss://")):
        limiter = RateLimiter(settings.broker_url, settings.rate_limit_per_minute)

    def refuse(message: str) -> NoReturn:
        # Failed attempts are counted per client address (a key guesser has no key id), so a
        # guesser is answered 429 once over the limit; callers with a valid key never pay.
        if limiter is not None:
            limiter.check(f"unauthorized:{request.remote_addr or 'unknown'}")
        raise Unauthorized(message)

    @app.before_request
    def _authenticate() -> None:
        path = request.path
        if path in OPEN_PATHS or (path == "/metrics" and not settings.metrics_require_auth):
            return
        if not keys:
            g.tenant, g.key_id = DEFAULT_TENANT, "anonymous"
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            refuse("an API key is required: Authorization: Bearer <key>")
        wanted = digest(token.strip())
        match = next((k for d, k in keys.items() if hmac.compare_digest(d, wanted)), None)
        if match is None:
            refuse("the API key is not valid")
        g.tenant, g.key_id = match.tenant, match.digest[:16]
        if limiter is not None:
            limiter.check(g.key_id)
