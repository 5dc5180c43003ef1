"""Job-change notices over Redis pub/sub, so that a long-polling client hears of a change at once.

The job record in the object store stays the only truth: a notice says "record X was written",
never what it holds, and a waiter re-reads the record. Notices are best effort (a lost one
costs a waiter at most one re-check interval), so publishing never fails a write and a waiter
also re-reads the record every ``RECHECK_SECONDS``. Without a Redis broker there are no
notices and waiters fall back to those re-checks alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from service.config import Settings

log = logging.getLogger(__name__)

_SHARED: dict[str, JobEvents] = {}
RECHECK_SECONDS = 2.0  # a waiter re-reads the record this often even without a notice
_NO_NOTICES_RECHECK_SECONDS = 0.5  # and this often when there is no Redis to hear from


class JobEvents:
    """Publishes and awaits "job record changed" notices on channels named by record key."""

    def __init__(self, redis_url: str | None) -> None:
        self._redis: Any = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis

            self._redis = redis.Redis.from_url(
                redis_url, socket_timeout=2, socket_connect_timeout=1
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> JobEvents:
        """One per broker URL (its Redis connection pool is shared; redis-py starts a
        fresh pool in a forked process by itself)."""
        if settings.broker_url not in _SHARED:
            _SHARED[settings.broker_url] = cls(settings.broker_url)
        return _SHARED[settings.broker_url]

    @property
    def live(self) -> bool:
        """True when notices can be heard (a Redis broker)."""
        return self._redis is not None

    @staticmethod
    def channel(bucket: str, record_key: str) -> str:
        return f"edgepress:job-changed:{bucket}/{record_key}"

    def publish(self, channel: str) -> None:
        if self._redis is None:
            return
        try:
            self._redis.publish(channel, b"1")
        except Exception as exc:  # noqa: BLE001 - a notice is a hint; the write already happened
            log.debug("job notice on %s not published: %s", channel, exc)

    def subscribe(self, channel: str) -> Subscription:
        """Start listening (before reading the record, so no change can slip in between)."""
        pubsub = None
        if self._redis is not None:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
            except Exception as exc:  # noqa: BLE001 - fall back to re-reading the record
                log.debug("job notices on %s unavailable: %s", channel, exc)
                pubsub = None
        return Subscription(pubsub)


class Subscription:
    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    def wait(self, seconds: float) -> None:
        """Return at a notice, or after ``seconds`` (capped at the re-check interval)."""
        if self._pubsub is None:
            time.sleep(max(0.0, min(seconds, _NO_NOTICES_RECHECK_SECONDS)))
            return
        deadline = time.monotonic() + max(0.0, min(seconds, RECHECK_SECONDS))
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self._pubsub.get_message(timeout=left) is not None:
                    return
            except Exception:  # noqa: BLE001 - Redis went away: re-check by polling from now
                self.close()
                time.sleep(max(0.0, min(left, _NO_NOTICES_RECHECK_SECONDS)))
                return

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
