"""``JobStore``: job records on the object store, with conditional writes.

Layout (relative to the store's prefix):
- ``jobs/<id>/job.json``: the record; created with If-None-Match, updated with If-Match.
- ``jobs-by-time/<inverted ms>_<id>``: empty index objects, so that an ascending S3 listing
  gives the newest job first and ``next_cursor`` is simply the last index key returned.
- ``jobs/<id>/artifacts/<name>``: what the job produced.
- ``jobs-active/<id>``: empty markers of jobs not yet finished, so that the reconciler looks at
  live jobs only; removed once the job is terminal.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from service.errors import NotFound, PreconditionFailed, ValidationFailed
from service.jobs.events import JobEvents
from service.jobs.record import Job, JobState
from service.storage.s3 import ObjectStore

_MAX_MS = 16**12 - 1


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/artifacts/{name}"


def _index_key(job: Job) -> str:
    millis = int(job.id[4:16], 16)
    return f"jobs-by-time/{_MAX_MS - millis:013d}_{job.id}"


class JobStore:
    """Reads and writes job records. Every update is a compare-and-swap on the ETag."""

    def __init__(self, store: ObjectStore, events: JobEvents | None = None) -> None:
        self._store = store
        self._events = events

    def channel(self, job_id: str) -> str:
        """Where changes of this job's record are announced (``JobEvents``)."""
        bucket = str(getattr(self._store, "bucket", ""))
        return JobEvents.channel(bucket, str(getattr(self._store, "prefix", "")) + job_key(job_id))

    def _changed(self, job_id: str) -> None:
        if self._events is not None:
            self._events.publish(self.channel(job_id))

    def create(self, job: Job) -> Job:
        self._store.put(job_key(job.id), _dump(job), if_none_match=True)
        self._store.put(_index_key(job), b"", content_type="text/plain")
        self._store.put(f"jobs-active/{job.id}", b"", content_type="text/plain")
        return job

    def get_if_changed(self, job_id: str, etag: str | None, seconds: float) -> tuple[Job, str]:
        """The record and its ETag once it differs from ``etag`` (at once if it already does,
        or if the job is finished), or as it is after ``seconds``: a long poll. Woken by this
        store's change notices; without them it re-reads the record."""
        deadline = time.monotonic() + seconds
        events = self._events or JobEvents(None)
        with events.subscribe(self.channel(job_id)) as sub:
            while True:
                job, current = self.get_with_etag(job_id)
                left = deadline - time.monotonic()
                if bare_etag(current) != bare_etag(etag) or job.state.terminal or left <= 0:
                    return job, current
                sub.wait(left)

    def get(self, job_id: str) -> Job:
        job, _ = self.get_with_etag(job_id)
        return job

    def get_with_etag(self, job_id: str) -> tuple[Job, str]:
        if not _valid_id(job_id):
            raise NotFound(f"job {job_id!r} not found", code="job_not_found")
        obj = self._store.get(job_key(job_id))
        if obj is None:
            raise NotFound(f"job {job_id!r} not found", code="job_not_found")
        return Job.model_validate_json(obj.body), obj.etag

    def update(self, job_id: str, change: Callable[[Job], Job | None], attempts: int = 8) -> Job:
        """Apply ``change`` to the current record and write it back only if nobody wrote in
        between (If-Match); on a lost race re-read and retry. ``change`` returning None means
        "nothing to do" and returns the current record unchanged."""
        for _ in range(attempts):
            job, etag = self.get_with_etag(job_id)
            new = change(job)
            if new is None:
                return job
            try:
                self._store.put(job_key(job_id), _dump(new), if_match=etag)
            except PreconditionFailed:
                continue
            self._changed(job_id)
            if new.state.terminal:
                self._store.delete(f"jobs-active/{job_id}")
            return new
        raise PreconditionFailed(f"job {job_id} is being changed by others; retry")

    def page(
        self, *, limit: int = 20, cursor: str | None = None, state: JobState | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first. ``cursor`` is opaque to clients (it encodes the last index key seen)."""
        last_key = _decode_cursor(cursor) if cursor else None
        jobs: list[Job] = []
        while len(jobs) < limit:
            keys = self._store.list_keys("jobs-by-time/", start_after=last_key, limit=100)
            if not keys:
                return jobs, None
            for key in keys:
                last_key = key
                try:
                    job = self.get(_id_from_index(key))
                except NotFound:
                    continue  # index written, record deleted: skip it
                if state is None or job.state is state:
                    jobs.append(job)
                if len(jobs) >= limit:
                    break
        more = self._store.list_keys("jobs-by-time/", start_after=last_key, limit=1)
        return jobs, (_encode_cursor(last_key) if more and last_key else None)

    def active_ids(self) -> list[str]:
        """Ids of jobs that are not terminal yet (or whose marker was not cleared yet)."""
        return [k.rsplit("/", 1)[-1] for k in self._store.list_keys("jobs-active/", limit=1000)]

    def clear_active(self, job_id: str) -> None:
        self._store.delete(f"jobs-active/{job_id}")

    def delete(self, job: Job) -> None:
        self._store.delete_prefix(f"jobs/{job.id}/")
        self._store.delete(_index_key(job))
        self._changed(job.id)


def bare_etag(etag: str | None) -> str:
    """An ETag without its quotes (stores and clients quote them, or not)."""
    return (etag or "").strip().removeprefix("W/").strip('"')


def _dump(job: Job) -> bytes:
    return job.model_dump_json().encode()


def _id_from_index(key: str) -> str:
    return "job_" + key.rsplit("_", 1)[-1]


def _valid_id(job_id: str) -> bool:
    return (
        job_id.startswith("job_")
        and len(job_id) == 28
        and all(c in "0123456789abcdef" for c in job_id[4:])
    )


def _encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": key}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data: Any = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key = data["k"]
        if not isinstance(key, str) or not key.startswith("jobs-by-time/"):
            raise ValueError
        return key
    except (ValueError, KeyError, TypeError):
        raise ValidationFailed(
            "invalid cursor",
            code="invalid_cursor",
            extra={"errors": [{"field": "cursor", "message": "not a cursor this API returned"}]},
        ) from None
