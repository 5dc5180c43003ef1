"""Presigned uploads not yet completed: ``incoming/<id>.json`` (the record: kind, filename,
``expires_at``, ``max_bytes``) and ``incoming/<id>/data`` (what the client POSTed to the store).

Two rules live here because both the API and the worker's reconciler apply them:

- a pending upload counts against its tenant's storage quota with its size limit
  (``max_bytes``) until it is completed or expires (``reserved_bytes``), so a stranger cannot
  park unbounded bytes in presigned uploads it never completes;
- the lifecycle of ``incoming/``: an upload never completed is deleted, record and data, once
  it is ``GRACE_SECONDS`` past its expiry (``expire``; run by every worker's reconciler), and
  data with no record is deleted at once (a record is written before its URL is handed out).
  SeaweedFS's S3 gateway has no lifecycle rule that expires objects by prefix and age, so the
  reconciler does it, against any S3 store alike.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

from service.storage.s3 import S3ObjectStore

log = logging.getLogger(__name__)

PREFIX = "incoming/"
# After its presigned POST expired, an upload may still be completed for this long (the
# client's POST was accepted just before the expiry; completing downloads and inspects it).
GRACE_SECONDS = 3600


def record_key(upload_id: str) -> str:
    return f"{PREFIX}{upload_id}.json"


def data_key(upload_id: str) -> str:
    return f"{PREFIX}{upload_id}/data"


def _pending(store: S3ObjectStore) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Records by upload id, and the ids that have data."""
    records: dict[str, dict[str, Any]] = {}
    with_data: set[str] = set()
    for key in store.iter_keys(PREFIX):
        name = key[len(PREFIX):]
        if name.endswith(".json") and "/" not in name:
            obj = store.get(key)
            if obj is not None:
                try:
                    records[name[: -len(".json")]] = dict(json.loads(obj.body))
                except ValueError:
                    records[name[: -len(".json")]] = {}
        elif name.endswith("/data"):
            with_data.add(name[: -len("/data")])
    return records, with_data


def _expires(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["expires_at"]))
    except (KeyError, ValueError):
        return None


def reserved_bytes(store: S3ObjectStore, now: datetime, completing: str | None = None) -> int:
    """What the tenant's pending uploads reserve: ``max_bytes`` of each one not expired, but
    ``completing`` (the upload being completed now: its bytes are counted as they are)."""
    records, _ = _pending(store)
    total = 0
    for upload_id, record in records.items():
        expires = _expires(record)
        if upload_id != completing and expires is not None and expires > now:
            total += int(record.get("max_bytes", 0))
    return total


def expire(store: S3ObjectStore, now: datetime, grace: float = GRACE_SECONDS) -> list[str]:
    """Delete uploads never completed, ``grace`` seconds past their expiry (and data without a
    record); returns their ids."""
    records, with_data = _pending(store)
    gone: list[str] = []
    for upload_id in sorted(set(records) | with_data):
        record = records.get(upload_id)
        expires = _expires(record) if record is not None else None
        if record is None or expires is None or expires + timedelta(seconds=grace) < now:
            store.delete_prefix(f"{PREFIX}{upload_id}")
            gone.append(upload_id)
    if gone:
        log.info("incoming: expired %d upload(s) never completed", len(gone))
    return gone
