"""``EdgePressClient``: the Python client of the EdgePress HTTP API.

Typed with the API's own pydantic models (``Job``, ``ModelRecord``, ``DatasetRecord``,
``JobCreate``/``Constraints``, ``DeviceProfile``), so a response that does not match the
contract fails loudly here instead of deep in a pipeline.

Behaviour a CI step can rely on:

- **Retries**: 429 and 503 answers, 409 ``idempotency_in_progress`` and connection errors
  are retried with exponential backoff (with jitter), honouring ``Retry-After`` (seconds or an
  HTTP date).
- **Idempotency keys**: every POST carries an ``Idempotency-Key`` (a uuid per logical call,
  the same across its retries). The API replays the first answer to a repeated key, so a POST
  whose answer was lost on the wire is retried without creating a second job.
- **Streaming**: uploads stream from a file object (never read whole into memory) and are
  hashed on the way; the server's SHA-256 must equal ours. Files above
  ``presigned_threshold`` bytes (and any with ``presigned=True``) go straight to the object
  store through a presigned POST (``/v1/uploads``), then the API checks them as it would a
  direct upload. Downloads stream to disk in chunks
  and are checked against ``Content-Length``, the object store's MD5 ETag when it has one, and
  for ``model.onnx`` the job's ``result.bytes_after`` (and, optionally, the ONNX checker).
- **Errors**: every failure is one ``EdgePressError`` carrying the RFC 9457 problem
  (``status``, ``code``, ``detail``, ``errors``).

Example::

    client = EdgePressClient("http://127.0.0.1:8080")
    model = client.upload_model("mlp.onnx")
    job = client.submit_job(model.id, recipe=[{"pass": "quantize_dynamic"}])
    job = client.wait(job.id, on_progress=lambda j: print(j.stage, j.progress))
    client.download_artifact(job.id, "model.onnx", "mlp.int8.onnx")
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import requests
from pydantic import ValidationError

from service.engine.constraints import AutoConstraints as Constraints
from service.engine.devices.profile import DeviceProfile
from service.jobs.record import Job, JobState
from service.schemas import JobCreate
from service.uploads.records import DatasetRecord, ModelRecord, dataset_id_for, model_id_for

__all__ = ["EdgePressClient", "EdgePressError", "DEFAULT_TIMEOUT", "DEFAULT_MAX_RETRIES"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 5
UPLOAD_READ_TIMEOUT = 600.0  # the server inspects a model before answering an upload
CHUNK = 1024 * 1024
LONG_POLL_S = 20  # seconds a status request asks the API to hold it (``Prefer: wait``)
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
RETRY_STATUSES = frozenset({429, 503})
PRESIGNED_THRESHOLD = 256 * 1024**2  # larger uploads go straight to the object store


_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_artifact_name(name: str) -> str:
    """``name`` when it is a plain file name (``model.onnx``, ``report.json``); an artifact
    name comes from the server, so a path (``../x``, ``/etc/x``, ``a/b``), a hidden or odd
    name raises ``EdgePressError`` (``bad_response``) instead of choosing where we write."""
    if not isinstance(name, str) or not _ARTIFACT_NAME.fullmatch(name):
        raise EdgePressError(
            None, "bad_response", f"the server named an artifact {str(name)[:80]!r}: not a plain "
            "file name; nothing was written"
        )
    return name


class EdgePressError(Exception):
    """An API error (the RFC 9457 problem) or a client-side failure with the same shape.

    ``status`` is the HTTP status (``None`` when no answer came: connection errors, timeouts),
    ``code`` a stable machine code (the server's, or ``connection_error``, ``wait_timeout``,
    ``checksum_mismatch``, ``bad_response``), ``detail`` a human message, ``errors`` the
    per-field errors of a validation problem, ``problem`` the whole problem document.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}" if status is None else f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors or [])
        self.problem = dict(problem or {})

    @classmethod
    def from_response(cls, resp: requests.Response) -> EdgePressError:
        """Build from an error response (problem+json when the server sent one)."""
        body: dict[str, Any] = {}
        try:
            parsed = resp.json()
            if isinstance(parsed, dict):
                body = parsed
        except ValueError:
            pass
        code = str(body.get("code") or f"http_{resp.status_code}")
        detail = str(body.get("detail") or body.get("title") or resp.reason or "error")
        return cls(resp.status_code, code, detail, body.get("errors"), body or None)

    def to_dict(self) -> dict[str, Any]:
        """The problem as JSON (what ``edgepress --json`` prints)."""
        out = dict(self.problem)
        out.update({"status": self.status, "code": self.code, "detail": self.detail})
        if self.errors:
            out["errors"] = self.errors
        return out


def _retry_after(resp: requests.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), if any."""
    raw = resp.headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _in_progress(resp: requests.Response) -> bool:
    """A 409 saying the first request under this Idempotency-Key is still being served."""
    if resp.status_code != 409:
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") == "idempotency_in_progress"


class _HashingReader:
    """Wraps a binary file: hashes what is read and tells requests the remaining length, so
    the body streams in chunks with a Content-Length (the server checks for truncation). A
    stream of unknown length goes out chunked."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._seekable = bool(getattr(fh, "seekable", lambda: False)())
        self._start = fh.tell() if self._seekable else 0
        self._length = self._size()
        self.digest = hashlib.sha256()
        self.sent = 0

    def _size(self) -> int | None:
        try:
            return os.fstat(self._fh.fileno()).st_size - self._start
        except (AttributeError, OSError, ValueError):
            pass
        if self._seekable:
            end = self._fh.seek(0, io.SEEK_END)
            self._fh.seek(self._start)
            return end - self._start
        return None

    @property
    def length(self) -> int | None:
        """Bytes to send, when known."""
        return self._length

    def prehash(self) -> str | None:
        """SHA-256 of the bytes still to send, read ahead and rewound (seekable files only)."""
        if not self._seekable:
            return None
        digest = hashlib.sha256()
        while chunk := self._fh.read(CHUNK):
            digest.update(chunk)
        self._fh.seek(self._start)
        return digest.hexdigest()

    def rewind(self) -> bool:
        """Go back to where the upload started (for a retry); False when impossible."""
        if self._seekable:
            self._fh.seek(self._start)
        elif self.sent:
            return False
        self.digest = hashlib.sha256()
        self.sent = 0
        return True

    def __bool__(self) -> bool:
        return True  # requests drops a falsy body (``data or {}``); ours may have no length

    # requests' super_len() computes the body length as len(body) - body.tell().
    def __len__(self) -> int:
        return self._length or 0

    def tell(self) -> int:
        return self.sent if self._length is not None else 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = self._fh.read(CHUNK if size is None or size < 0 else max(size, 64 * 1024))
        if chunk:
            self.digest.update(chunk)
            self.sent += len(chunk)
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk


class _MultipartBody:
    """A ``multipart/form-data`` body for a presigned POST, streamed: the policy fields, then
    the file (read in chunks through the hashing reader), with an exact Content-Length."""

    def __init__(self, fields: dict[str, str], reader: _HashingReader, filename: str) -> None:
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            .encode() for k, v in fields.items())
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{safe_name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 ).encode()
        self._head, self._tail = head, f"\r\n--{boundary}--\r\n".encode()
        self._reader = reader
        self._total = len(head) + (reader.length or 0) + len(self._tail)
        self._sent = 0

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._total

    def tell(self) -> int:
        return self._sent

    def read(self, size: int | None = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else max(size, 64 * 1024)
        head_left = len(self._head) - self._sent
        if head_left > 0:
            chunk = self._head[self._sent:self._sent + min(want, head_left)]
        else:
            chunk = self._reader.read(want)
            if not chunk:
                tail_at = self._sent - len(self._head) - self._reader.sent
                chunk = self._tail[tail_at:tail_at + want]
        self._sent += len(chunk)
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk


class EdgePressClient:
    """A client of one EdgePress API (``base_url`` like ``http://127.0.0.1:8080``).

    ``api_key`` is sent as ``Authorization: Bearer <key>`` (for a gateway in front of the API);
    ``timeout`` is the per-request connect/read timeout in seconds; ``max_retries`` the retries
    of one call on 429/503/connection errors. ``skip_stored_uploads``: hash a file first and
    send it only if the API does not hold those bytes already (ids are content-derived), so a
    pipeline that submits the same model on every run uploads it once.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        *,
        session: requests.Session | None = None,
        backoff: float = 0.5,
        user_agent: str = "edgepress-client/0.1",
        presigned_threshold: int | None = PRESIGNED_THRESHOLD,
        skip_stored_uploads: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.skip_stored_uploads = skip_stored_uploads
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.presigned_threshold = presigned_threshold
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = user_agent
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"

    # -- transport -------------------------------------------------------------------------
    def _delay(self, attempt: int, resp: requests.Response | None) -> float:
        hinted = _retry_after(resp) if resp is not None else None
        if hinted is not None:
            return min(hinted, MAX_RETRY_AFTER_S)
        base = min(MAX_BACKOFF_S, self.backoff * (2**attempt))
        return base * (0.5 + random.random() / 2)  # jitter: replicas do not retry in step

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        body: _HashingReader | None = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
    ) -> requests.Response:
        """One logical call, retried; returns the final response or raises EdgePressError."""
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        hdrs = dict(headers or {})
        if method == "POST":
            hdrs.setdefault("Idempotency-Key", str(uuid.uuid4()))  # same key on every retry
        timeout = (self.timeout, read_timeout or self.timeout)
        attempt = 0
        while True:
            if body is not None and attempt and not body.rewind():
                raise EdgePressError(None, "upload_not_retryable",
                                     "the upload failed and its stream cannot be rewound")
            try:
                resp = self.http.request(method, url, params=params, json=json, data=body,
                                         headers=hdrs, timeout=timeout, allow_redirects=False)
            except requests.exceptions.RequestException as exc:
                # POSTs too: the API replays the first answer to a repeated Idempotency-Key.
                if attempt >= self.max_retries:
                    raise EdgePressError(None, "connection_error",
                                         f"{method} {url} failed: {type(exc).__name__}: {exc}"
                                         ) from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if (resp.status_code in RETRY_STATUSES or _in_progress(resp)) \
                    and attempt < self.max_retries:
                delay = self._delay(attempt, resp)
                resp.close()
                time.sleep(delay)
                attempt += 1
                continue
            if resp.status_code in ok or resp.status_code == 302:
                return resp
            raise EdgePressError.from_response(resp)

    def _json(self, resp: requests.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise EdgePressError(resp.status_code, "bad_response",
                                 "the server answered with a body that is not JSON") from None

    @staticmethod
    def _parse(cls: Any, data: Any) -> Any:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EdgePressError(None, "bad_response",
                                 f"the server's {cls.__name__} does not match the contract: "
                                 f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def _pages(self, path: str, cls: Any, params: dict[str, Any]) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            page_params = dict(params)
            if cursor:
                page_params["cursor"] = cursor
            page = self._json(self._request("GET", path, params=page_params))
            for item in page.get("items", []):
                yield self._parse(cls, item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # -- uploads ---------------------------------------------------------------------------
    def _upload(self, path: str, source: str | os.PathLike[str] | IO[bytes],
                filename: str | None, presigned: bool | None = None) -> dict[str, Any]:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fh:
                return self._upload(path, fh, filename or Path(source).name, presigned)
        reader = _HashingReader(source)
        size = reader.length
        if self.skip_stored_uploads and size is not None:
            stored = self._stored(path, reader)
            if stored is not None:
                return stored
        if presigned is None:
            presigned = (self.presigned_threshold is not None and size is not None
                         and size > self.presigned_threshold)
        if presigned:
            if size is None:
                raise EdgePressError(None, "presigned_needs_size",
                                     "a presigned upload needs a file of known size")
            kind = "model" if path == "/v1/models" else "dataset"
            resp, record = self._upload_presigned(kind, reader, filename)
        else:
            params = {"filename": filename} if filename else None
            resp = self._request("POST", path, params=params, body=reader,
                                 headers={"Content-Type": "application/octet-stream"},
                                 read_timeout=max(self.timeout, UPLOAD_READ_TIMEOUT))
            record = self._json(resp)
        local = reader.digest.hexdigest()
        if record.get("sha256") != local:
            raise EdgePressError(resp.status_code, "checksum_mismatch",
                                 f"the server stored sha256 {record.get('sha256')}, the file "
                                 f"sent has {local}", problem={"local_sha256": local})
        return dict(record)

    def _stored(self, path: str, reader: _HashingReader) -> dict[str, Any] | None:
        """The record of the bytes ``reader`` would send, if the API holds them already."""
        local = reader.prehash()
        if local is None:
            return None
        ident = (model_id_for if path == "/v1/models" else dataset_id_for)(local)
        resp = self._request("GET", f"{path}/{ident}", ok=(200, 404))
        if resp.status_code != 200:
            return None
        record = dict(self._json(resp))
        if record.get("sha256") != local or record.get("bytes") != reader.length:
            return None  # an id collision on the 128-bit prefix: upload and let the API decide
        return record

    def _upload_presigned(self, kind: str, reader: _HashingReader,
                          filename: str | None) -> tuple[requests.Response, dict[str, Any]]:
        """``POST /v1/uploads`` for a presigned POST, stream the file to the object store,
        then ``complete`` it (the API checks it like a direct upload)."""
        ticket = self._json(self._request("POST", "/v1/uploads",
                                          json={"kind": kind, "filename": filename}))
        attempt = 0
        while True:
            body = _MultipartBody(ticket["fields"], reader, filename or "upload")
            stored: requests.Response | None = None
            error: requests.exceptions.RequestException | None = None
            try:
                # A plain request: the store's URL must not see our Authorization header.
                stored = requests.post(
                    ticket["url"], data=body, timeout=(self.timeout, UPLOAD_READ_TIMEOUT),
                    headers={"Content-Type": body.content_type})
            except requests.exceptions.RequestException as exc:
                error = exc
            else:
                if stored.status_code in (200, 201, 204):
                    break
                if stored.status_code not in (429, 500, 502, 503, 504):
                    raise EdgePressError(stored.status_code, "presigned_upload_failed",
                                         f"the object store refused the upload: "
                                         f"{stored.text[:300]}")
            if attempt >= self.max_retries or not reader.rewind():
                raise EdgePressError(None, "presigned_upload_failed",
                                     f"the upload to the object store failed: {error or stored}")
            time.sleep(self._delay(attempt, stored))
            attempt += 1
        resp = self._request("POST", ticket["complete_url"],
                             read_timeout=max(self.timeout, UPLOAD_READ_TIMEOUT))
        return resp, dict(self._json(resp))

    def upload_model(self, source: str | os.PathLike[str] | IO[bytes],
                     filename: str | None = None, *,
                     presigned: bool | None = None) -> ModelRecord:
        """Stream a model (``.onnx`` or a ``.zip``/``.tar`` with external data) to the API.

        ``source`` is a path or a binary file object (read in chunks, rewound for a retry when
        seekable). Uploading the same bytes again returns the same record. Raises
        ``EdgePressError`` (``not_onnx``, ``unsafe_format``, ``payload_too_large``,
        ``checksum_mismatch`` ...). ``presigned``: send the bytes straight to the object store
        (default: when the file is larger than ``presigned_threshold``).
        """
        record: ModelRecord = self._parse(
            ModelRecord, self._upload("/v1/models", source, filename, presigned))
        return record

    def upload_dataset(self, source: str | os.PathLike[str] | IO[bytes],
                       filename: str | None = None, *,
                       presigned: bool | None = None) -> DatasetRecord:
        """Stream an ``.npz`` dataset (arrays keyed by model input name, optional ``labels``)."""
        record: DatasetRecord = self._parse(
            DatasetRecord, self._upload("/v1/datasets", source, filename, presigned))
        return record

    # -- models ------------------------------------------------------------------------------
    def get_model(self, model_id: str) -> ModelRecord:
        """The record of an uploaded model."""
        out: ModelRecord = self._parse(ModelRecord,
                                       self._json(self._request("GET", f"/v1/models/{model_id}")))
        return out

    def list_models(self, page_size: int = 100) -> Iterator[ModelRecord]:
        """Every uploaded model (pages are fetched as the iterator advances)."""
        return self._pages("/v1/models", ModelRecord, {"limit": page_size})

    def get_dataset(self, dataset_id: str) -> DatasetRecord:
        """The record of an uploaded dataset."""
        out: DatasetRecord = self._parse(
            DatasetRecord, self._json(self._request("GET", f"/v1/datasets/{dataset_id}")))
        return out

    def list_datasets(self, page_size: int = 100) -> Iterator[DatasetRecord]:
        """Every uploaded dataset (pages are fetched as the iterator advances)."""
        return self._pages("/v1/datasets", DatasetRecord, {"limit": page_size})

    # -- jobs --------------------------------------------------------------------------------
    def submit_job(
        self,
        model_id: str,
        recipe: list[dict[str, Any]] | str = "auto",
        *,
        device: str | dict[str, Any] = "host",
        constraints: Constraints | dict[str, Any] | None = None,
        dataset_id: str | None = None,
        callback_url: str | None = None,
        input_shapes: dict[str, Sequence[int]] | None = None,
        input_values: dict[str, bool | int | float] | None = None,
    ) -> Job:
        """Start a job: ``recipe`` is ``"auto"`` or ordered steps ``[{"pass": name, ...}]``.

        ``input_shapes`` (``{"image": [1, 3, 640, 640]}``) and ``input_values`` (``{"sr":
        16000}``) say what generated evaluation/calibration inputs are when no dataset is
        given; the API checks them against the model's inputs (names, rank, static dims).

        The request is validated here with the API's ``JobCreate`` first (a typo in a
        constraint fails before any network call, as ``EdgePressError(None,
        "validation_error")``).
        """
        inputs: dict[str, dict[str, Any]] = {}
        for name, shape in (input_shapes or {}).items():
            inputs.setdefault(name, {})["shape"] = list(shape)
        for name, value in (input_values or {}).items():
            inputs.setdefault(name, {})["value"] = value
        try:
            spec = JobCreate(
                model_id=model_id, device=device, recipe=recipe,  # type: ignore[arg-type]
                constraints=(constraints if isinstance(constraints, Constraints)
                             else Constraints.model_validate(constraints or {})),
                dataset_id=dataset_id, callback_url=callback_url,
                inputs=inputs,  # type: ignore[arg-type]
            )
        except ValidationError as exc:
            errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                      for e in exc.errors()]
            raise EdgePressError(None, "validation_error",
                                 f"invalid job request: {errors[0]['field']}: "
                                 f"{errors[0]['message']}", errors) from None
        return self.submit(spec)

    def submit(self, spec: JobCreate) -> Job:
        """Start a job from a ready ``JobCreate``."""
        body = spec.model_dump(mode="json", exclude_none=True)
        body["constraints"] = spec.constraints.model_dump(mode="json", exclude_none=True)
        if not body.get("inputs"):
            body.pop("inputs", None)
        out: Job = self._parse(Job, self._json(self._request("POST", "/v1/jobs", json=body)))
        return out

    def get_job(self, job_id: str) -> Job:
        """The job's current record (state, stage, progress, result or error, artifacts)."""
        out: Job = self._parse(Job, self._json(self._request("GET", f"/v1/jobs/{job_id}")))
        return out

    def list_jobs(self, state: JobState | str | None = None,
                  page_size: int = 100) -> Iterator[Job]:
        """Every job, newest first, optionally only those in ``state`` (pages fetched lazily)."""
        params: dict[str, Any] = {"limit": page_size}
        if state:
            params["state"] = JobState(state).value
        return self._pages("/v1/jobs", Job, params)

    def cancel_job(self, job_id: str) -> Job:
        """Cancel: a queued job at once, a running one within seconds (poll to see it)."""
        out: Job = self._parse(Job, self._json(self._request(
            "POST", f"/v1/jobs/{job_id}/cancel")))
        return out

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job and its artifacts."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        poll: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Follow the job until it is succeeded, failed or cancelled; return its final record.

        Long polling: each request asks the API to hold it until the record changes
        (``Prefer: wait``, ``If-None-Match``), so a change is seen as it happens; when the API
        answers at once instead (its held requests are at their bound), the next request
        follows after ``poll`` seconds. ``on_progress(job)`` is called whenever state, stage
        or progress changed. Raises ``EdgePressError(None, "wait_timeout")`` after
        ``timeout`` seconds (the job goes on). A failed job is returned, not raised: check
        ``job.state`` and ``job.error``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[Any, ...] | None = None
        job: Job | None = None
        etag: str | None = None
        while True:
            first_look = job is None  # answered at once, then followed by held requests
            left = LONG_POLL_S if deadline is None else deadline - time.monotonic()
            hold = 0 if first_look else int(min(LONG_POLL_S, left))
            headers = {"Prefer": f"wait={hold}"} if hold >= 1 else {}
            if etag and job is not None:
                headers["If-None-Match"] = etag
            resp = self._request("GET", f"/v1/jobs/{job_id}", headers=headers, ok=(200, 304),
                                 read_timeout=self.timeout + hold)
            if resp.status_code == 200 or job is None:
                job = self._parse(Job, self._json(resp))
                etag = resp.headers.get("ETag")
            held = "wait" in resp.headers.get("Preference-Applied", "")
            assert job is not None
            seen = (job.state, job.stage, round(job.progress, 4))
            if seen != last:
                last = seen
                if on_progress is not None:
                    on_progress(job)
            if job.state.terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise EdgePressError(None, "wait_timeout",
                                     f"job {job_id} is still {job.state.value} ({job.stage}) "
                                     f"after {timeout:g} s", problem={"job": job.public()})
            if not held and not (first_look and left >= 1):
                time.sleep(poll if deadline is None else
                           max(0.0, min(poll, deadline - time.monotonic())))

    def list_artifacts(self, job_id: str) -> list[str]:
        """Names of a job's artifacts (``model.onnx``, ``report.json``, ``report.html`` ...)."""
        page = self._json(self._request("GET", f"/v1/jobs/{job_id}/artifacts"))
        return [str(item["name"]) for item in page.get("items", [])]

    def artifact_url(self, job_id: str, name: str) -> str:
        """The short-lived presigned URL the API redirects to."""
        resp = self._request("GET", f"/v1/jobs/{job_id}/artifacts/{name}", ok=())
        location = resp.headers.get("Location")
        if resp.status_code != 302 or not location:
            raise EdgePressError(resp.status_code, "bad_response",
                                 "the artifact answer is not a redirect")
        return location if "://" in location else self.base_url + location

    def download_artifact(
        self,
        job_id: str,
        name: str,
        target: str | os.PathLike[str],
        *,
        job: Job | None = None,
        check_onnx: bool = False,
    ) -> Path:
        """Stream an artifact to ``target`` (a file, or a directory to put ``name`` in).

        Verified before it is moved into place: byte count against ``Content-Length``, the MD5
        against the store's ETag when the ETag is a plain MD5 (single-part objects), and for
        ``model.onnx`` the size against the job's ``result.bytes_after`` and, with
        ``check_onnx``, the ONNX checker. A failed check raises ``checksum_mismatch`` and
        leaves no file behind.

        A model kept in external data (past 2 GiB, or past the server's inline limit) is two
        artifacts, ``model.onnx`` and ``model.onnx.data``, to be saved side by side (the
        model names its data file ``model.onnx.data``, relative to itself): those checks then
        run once ``model.onnx.data`` lands beside ``model.onnx`` (the two files' bytes
        against ``bytes_after``, the checker on ``model.onnx`` with its data).
        """
        dest = Path(target)
        if dest.is_dir():
            dest = dest / safe_artifact_name(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if name in ("model.onnx", "model.onnx.data") and job is None:
            job = self.get_job(job_id)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        attempt = 0
        while True:
            url = self.artifact_url(job_id, name)  # fresh URL each try: they expire
            try:
                sha, md5, size, resp = self._stream_to(url, tmp)
                break
            except requests.exceptions.RequestException as exc:
                tmp.unlink(missing_ok=True)
                if attempt >= self.max_retries:
                    raise EdgePressError(None, "connection_error",
                                         f"downloading {name} failed: {exc}") from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
        try:
            self._verify(name, tmp, size, md5, resp, job, check_onnx)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        model = dest.with_name("model.onnx")
        if name == "model.onnx.data" and dest.name == name and model.is_file():
            try:  # the pair, once the data file is where the model reads it from
                self._verify_model(model, model.stat().st_size + size, job, check_onnx)
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
        return dest

    @staticmethod
    def _verify_model(model: Path, size: int, job: Job | None, check_onnx: bool) -> None:
        """``model.onnx`` with ``model.onnx.data`` beside it: the two files' bytes against
        ``bytes_after``, and with ``check_onnx`` the checker on the model with its data."""
        def fail(why: str) -> EdgePressError:
            return EdgePressError(None, "checksum_mismatch", f"model.onnx.data: {why}")

        expected = (job.result or {}).get("bytes_after") if job is not None else None
        if expected is not None and int(expected) != size:
            raise fail(f"model.onnx and model.onnx.data hold {size} bytes, the job's result "
                       f"says {expected}")
        if check_onnx:
            import onnx

            try:
                onnx.checker.check_model(str(model))
            except Exception as exc:  # noqa: BLE001 - any checker failure: a bad file
                raise fail(f"not a valid ONNX model ({type(exc).__name__})") from None

    def _stream_to(self, url: str, path: Path) -> tuple[str, str, int, requests.Response]:
        # A plain session: the presigned URL must not carry our Authorization header.
        resp = requests.get(url, stream=True, timeout=(self.timeout, self.timeout))
        if resp.status_code != 200:
            raise EdgePressError.from_response(resp)
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        with resp, open(path, "wb") as out:
            for chunk in resp.iter_content(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return sha.hexdigest(), md5.hexdigest(), size, resp

    @staticmethod
    def _verify(name: str, path: Path, size: int, md5: str, resp: requests.Response,
                job: Job | None, check_onnx: bool) -> None:
        def fail(why: str) -> EdgePressError:
            return EdgePressError(None, "checksum_mismatch", f"{name}: {why}")

        declared = resp.headers.get("Content-Length")
        if declared is not None and int(declared) != size:
            raise fail(f"received {size} bytes, the store announced {declared}")
        etag = resp.headers.get("ETag", "").strip('"')
        if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) and etag != md5:
            raise fail(f"MD5 {md5} differs from the store's ETag {etag}")
        # Weights in model.onnx.data: checked with it (``_verify_model``).
        external = job is not None and "model.onnx.data" in (job.artifacts or [])
        if name == "model.onnx" and job is not None and job.result and not external:
            expected = job.result.get("bytes_after")
            if expected is not None and int(expected) != size:
                raise fail(f"{size} bytes, the job's result says {expected}")
        if name == "model.onnx" and check_onnx and not external:
            import onnx

            try:
                onnx.checker.check_model(str(path))
            except Exception as exc:  # noqa: BLE001 - any checker failure means a bad file
                raise fail(f"not a valid ONNX model ({type(exc).__name__})") from None

    # -- devices -----------------------------------------------------------------------------
    def list_devices(self) -> list[DeviceProfile]:
        """The device catalogue (and ``host``, the workers' CPU)."""
        page = self._json(self._request("GET", "/v1/devices"))
        return [self._parse(DeviceProfile, item) for item in page.get("items", [])]

    def get_device(self, name: str) -> DeviceProfile:
        """One device profile by name."""
        out: DeviceProfile = self._parse(
            DeviceProfile, self._json(self._request("GET", f"/v1/devices/{name}")))
        return out

    # -- operations --------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when the API answers ``/readyz`` with 200 (store and broker reachable)."""
        try:
            resp = self.http.get(self.base_url + "/readyz", timeout=self.timeout)
        except requests.exceptions.RequestException:
            return False
        return resp.status_code == 200
