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

from flask import Flask, g, request

from service.config import Settings
from service.errors import ServiceError
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
    """Digest -> key, from the settings. Raises ValueError on a malformed configuration."""
    keys: dict[str, ApiKey] = {}
    if settings.api_keys is not None:
        for i, item in enumerate(filter(None, settings.api_keys.get_secret_value().split(","))):
            tenant, sep, key = item.strip().partition(":")
            if not sep or not key or not TENANT_NAME.match(tenant):
                raise ValueError(f'EDGEPRESS_API_KEYS entry {i} must be "tenant:key"')
            keys[digest(key)] = ApiKey(tenant, f"env-{i}", digest(key))
    if settings.api_keys_file:
        entries = json.loads(Path(settings.api_keys_file).read_text())
        for entry in entries:
            tenant, sha = str(entry["tenant"]), str(entry["sha256"]).lower()
            if not TENANT_NAME.match(tenant) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError("api keys file: each entry needs a valid tenant and sha256")
            keys[sha] = ApiKey(tenant, str(entry.get("name", sha[:8])), sha)
    return keys


class RateLimiter:
    """Fixed-window counter per key in Redis (shared by every API replica)."""

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
        except Exception as exc:  # the limiter must not take the API down with Redis
            log.warning("rate limiter unavailable: %s", exc)
            return
        if count > self.per_minute:
            retry = 60 - int(time.time()) % 60
            raise RateLimited(
                f"rate limit of {self.per_minute} requests per minute exceeded",
                headers={"Retry-After": str(max(1, retry))},
            )


def init_app(app: Flask, settings: Settings) -> None:
    keys = load_keys(settings)
    limiter = None
    if settings.rate_limit_per_minute and settings.broker_url.startswith(("redis://", "rediss://")):
        limiter = RateLimiter(settings.broker_url, settings.rate_limit_per_minute)

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
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        wanted = digest(token.strip())
        match = next((k for d, k in keys.items() if hmac.compare_digest(d, wanted)), None)
        if match is None:
            raise Unauthorized("the API key is not valid")
        g.tenant, g.key_id = match.tenant, match.digest[:16]
        if limiter is not None:
            limiter.check(g.key_id)
