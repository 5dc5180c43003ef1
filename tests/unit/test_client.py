"""EdgePressClient: retry protocol, idempotency keys, streaming and checksums, typed results.

The retry and checksum rules are driven by a scripted loopback HTTP server (it answers what a
test needs: a 503 with Retry-After, a wrong sha256) because the real API cannot be made to do
so on demand; everything else runs against the real local stack (``@pytest.mark.stack``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from service.client import EdgePressClient, EdgePressError, _retry_after
from service.devstack import free_port
from service.engine.devices.profile import DeviceProfile
from service.jobs.record import Job, JobState
from service.uploads.records import ModelRecord

Reply = tuple[int, dict[str, str], bytes]


class _Scripted:
    """A loopback HTTP server answering from a list of handlers, recording every request."""

    def __init__(self, replies: list[Callable[[dict[str, Any]], Reply]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = self.headers.get("Content-Length")
                chunked = self.headers.get("Transfer-Encoding") == "chunked"
                body = b""
                if length:
                    remaining = int(length)
                    while remaining:  # read in chunks, as the API does
                        part = self.rfile.read(min(remaining, 65536))
                        if not part:
                            break
                        body += part
                        remaining -= len(part)
                elif chunked:
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                req = {"method": self.command, "path": self.path,
                       "headers": dict(self.headers), "body": body}
                owner.requests.append(req)
                status, headers, payload = owner.replies.pop(0)(req)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(status: int, body: Any, **headers: str) -> Callable[[dict[str, Any]], Reply]:
    ctype = "application/problem+json" if status >= 400 else "application/json"
    return lambda req: (status, {"Content-Type": ctype, **headers}, json.dumps(body).encode())


def _job(**over: Any) -> dict[str, Any]:
    job = Job(id="job_1", model_id="mdl_" + "0" * 32, device="host",
              recipe=[{"pass": "quantize_dynamic"}], created_at=datetime.now(UTC))
    return job.model_copy(update=over).public()


def _problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"https://edgepress.dev/problems/{code}", "title": "x", "status": status,
            "detail": f"{code} happened", "code": code, **extra}


# ---------------------------------------------------------------------------------------------
# Retry protocol


def test_503_is_retried_after_retry_after_with_the_same_idempotency_key() -> None:
    with _Scripted([_json(503, _problem(503, "service_unavailable"), **{"Retry-After": "1"}),
                    _json(202, _job())]) as srv:
        client = EdgePressClient(srv.url, max_retries=3)
        started = time.monotonic()
        job = client.submit_job("mdl_" + "0" * 32, recipe=[{"pass": "quantize_dynamic"}])
        elapsed = time.monotonic() - started
    assert isinstance(job, Job) and job.state is JobState.queued
    assert len(srv.requests) == 2
    keys = [r["headers"].get("Idempotency-Key") for r in srv.requests]
    assert keys[0] and keys[0] == keys[1]
    assert elapsed >= 0.95, "Retry-After: 1 was not honoured"
    sent = json.loads(srv.requests[0]["body"])
    assert sent["recipe"] == [{"pass": "quantize_dynamic"}] and "dataset_id" not in sent


def test_input_shapes_and_values_travel_as_job_inputs() -> None:
    with _Scripted([_json(202, _job())]) as srv:
        EdgePressClient(srv.url).submit_job(
            "mdl_" + "0" * 32, "auto", input_shapes={"image": (1, 3, 640, 640)},
            input_values={"sr": 16000})
    sent = json.loads(srv.requests[0]["body"])
    assert sent["inputs"] == {"image": {"shape": [1, 3, 640, 640]}, "sr": {"value": 16000}}
    with pytest.raises(EdgePressError) as info:  # refused before any request
        EdgePressClient("http://127.0.0.1:9").submit_job(
            "mdl_x", "auto", input_shapes={"image": [1, 0, 640]})
    assert info.value.code == "validation_error" and "inputs" in info.value.errors[0]["field"]


def test_each_logical_post_gets_its_own_idempotency_key() -> None:
    with _Scripted([_json(202, _job()), _json(202, _job())]) as srv:
        client = EdgePressClient(srv.url)
        client.submit_job("mdl_" + "0" * 32, recipe="auto")
        client.submit_job("mdl_" + "0" * 32, recipe="auto")
    keys = {r["headers"]["Idempotency-Key"] for r in srv.requests}
    assert len(keys) == 2


def test_409_in_progress_is_retried_under_the_same_key() -> None:
    busy = _problem(409, "idempotency_in_progress")
    with _Scripted([_json(409, busy, **{"Retry-After": "0"}), _json(202, _job())]) as srv:
        EdgePressClient(srv.url).cancel_job("job_1")
    assert [r["path"] for r in srv.requests] == ["/v1/jobs/job_1/cancel"] * 2
    assert len({r["headers"]["Idempotency-Key"] for r in srv.requests}) == 1


def test_409_conflict_is_not_retried() -> None:
    with _Scripted([_json(409, _problem(409, "idempotency_key_reused"))]) as srv, \
            pytest.raises(EdgePressError) as info:
        EdgePressClient(srv.url).cancel_job("job_1")
    assert info.value.code == "idempotency_key_reused" and len(srv.requests) == 1


def test_429_gives_up_after_max_retries_with_the_problem() -> None:
    replies = [_json(429, _problem(429, "rate_limited"), **{"Retry-After": "0"})] * 3
    with _Scripted(replies) as srv:
        client = EdgePressClient(srv.url, max_retries=2)
        with pytest.raises(EdgePressError) as info:
            client.get_job("job_1")
    assert len(srv.requests) == 3
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert info.value.detail == "rate_limited happened"


def test_problem_json_becomes_one_error_type_with_field_errors() -> None:
    errors = [{"field": "recipe[0].per_channel", "message": "bool expected"}]
    with _Scripted([_json(422, _problem(422, "invalid_recipe", errors=errors))]) as srv, \
            pytest.raises(EdgePressError) as info:
        EdgePressClient(srv.url).submit_job("mdl_x", recipe=[{"pass": "quantize_static"}])
    exc = info.value
    assert (exc.status, exc.code, exc.errors) == (422, "invalid_recipe", errors)
    assert exc.to_dict()["type"].endswith("/invalid_recipe")
    assert len(srv.requests) == 1, "a 422 must not be retried"


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    def resp(value: str) -> requests.Response:
        r = requests.Response()
        r.headers["Retry-After"] = value
        return r

    assert _retry_after(resp("7")) == 7.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (_retry_after(resp(when)) or 0) <= 31
    assert _retry_after(resp("soon")) is None
    assert _retry_after(requests.Response()) is None


def test_connection_refused_is_retried_then_reported() -> None:
    client = EdgePressClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01,
                             timeout=2)
    with pytest.raises(EdgePressError) as info:
        client.get_job("job_1")
    assert info.value.status is None and info.value.code == "connection_error"


def test_invalid_request_fails_before_the_network() -> None:
    client = EdgePressClient(f"http://127.0.0.1:{free_port()}", max_retries=0)
    with pytest.raises(EdgePressError) as info:
        client.submit_job("mdl_x", recipe="auto", constraints={"max_size_mb": -1})
    assert info.value.code == "validation_error" and info.value.status is None
    assert info.value.errors[0]["field"] == "max_size_mb"
    with pytest.raises(EdgePressError):
        client.submit_job("mdl_x", recipe="auto", constraints={"max_size_gb": 1})


# ---------------------------------------------------------------------------------------------
# Streaming upload and checksums


_NOT_STORED = _json(404, _problem(404, "model_not_found"))


def _model_reply(sha: Callable[[bytes], str]) -> Callable[[dict[str, Any]], Reply]:
    def reply(req: dict[str, Any]) -> Reply:
        record = ModelRecord(id="mdl_" + "1" * 32, sha256=sha(req["body"]),
                             bytes=len(req["body"]), created_at=datetime.now(UTC), format="onnx")
        return 201, {"Content-Type": "application/json"}, record.model_dump_json().encode()
    return reply


def test_upload_streams_with_content_length_and_checks_the_sha256(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with _Scripted([_NOT_STORED, _model_reply(lambda b: hashlib.sha256(b).hexdigest())]) as srv:
        record = EdgePressClient(srv.url).upload_model(path)
    lookup, req = srv.requests
    assert lookup["method"] == "GET"
    assert lookup["path"] == "/v1/models/mdl_" + hashlib.sha256(data).hexdigest()[:32]
    assert req["headers"]["Content-Length"] == str(len(data))
    assert req["path"] == "/v1/models?filename=m.onnx"
    assert req["body"] == data and isinstance(record, ModelRecord)


def test_upload_with_a_wrong_server_checksum_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x" * 100_000)
    with _Scripted([_NOT_STORED, _model_reply(lambda b: "0" * 64)]) as srv, pytest.raises(
            EdgePressError) as info:
        EdgePressClient(srv.url).upload_model(path)
    assert info.value.code == "checksum_mismatch"


def test_retried_upload_resends_the_whole_file_from_its_start(tmp_path: Path) -> None:
    data = b"head" + b"y" * 300_000
    fh = io.BytesIO(data)
    fh.seek(4)  # the upload starts where the file object is
    replies = [_NOT_STORED,
               _json(503, _problem(503, "service_unavailable"), **{"Retry-After": "0"}),
               _model_reply(lambda b: hashlib.sha256(b).hexdigest())]
    with _Scripted(replies) as srv:
        EdgePressClient(srv.url).upload_model(fh, filename="m.onnx")
    lookup, *posts = srv.requests
    assert lookup["path"] == "/v1/models/mdl_" + hashlib.sha256(data[4:]).hexdigest()[:32]
    assert [r["body"] for r in posts] == [data[4:], data[4:]]
    assert posts[0]["headers"]["Idempotency-Key"] == posts[1]["headers"]["Idempotency-Key"]


def _stored_reply(data: bytes, sha: str | None = None) -> Callable[[dict[str, Any]], Reply]:
    record = ModelRecord(id="mdl_" + hashlib.sha256(data).hexdigest()[:32],
                         sha256=sha or hashlib.sha256(data).hexdigest(), bytes=len(data),
                         created_at=datetime.now(UTC), format="onnx")
    return lambda req: (200, {"Content-Type": "application/json"},
                        record.model_dump_json().encode())


def test_bytes_the_api_already_holds_are_not_sent_again(tmp_path: Path) -> None:
    data = b"m" * 300_000
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with _Scripted([_stored_reply(data)]) as srv:
        record = EdgePressClient(srv.url).upload_model(path)
    assert [(r["method"], r["body"]) for r in srv.requests] == [
        ("GET", b"")], "a stored model must be found by its hash, not uploaded"
    assert record.sha256 == hashlib.sha256(data).hexdigest()


def test_a_stored_record_that_does_not_match_the_file_is_not_trusted(tmp_path: Path) -> None:
    data = b"n" * 300_000
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    replies = [_stored_reply(data, sha="f" * 64),  # same id prefix, other bytes: upload
               _model_reply(lambda b: hashlib.sha256(b).hexdigest())]
    with _Scripted(replies) as srv:
        EdgePressClient(srv.url).upload_model(path)
    assert [r["method"] for r in srv.requests] == ["GET", "POST"]
    assert srv.requests[1]["body"] == data


def test_skipping_stored_uploads_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"o" * 1000)
    with _Scripted([_model_reply(lambda b: hashlib.sha256(b).hexdigest())]) as srv:
        EdgePressClient(srv.url, skip_stored_uploads=False).upload_model(path)
    assert [r["method"] for r in srv.requests] == ["POST"]


def test_unsized_stream_goes_out_chunked() -> None:
    class Pipe:  # a non-seekable stream, like stdin
        def __init__(self, data: bytes) -> None:
            self._buf = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

        def seekable(self) -> bool:
            return False

    data = b"z" * 200_000
    with _Scripted([_model_reply(lambda b: hashlib.sha256(b).hexdigest())]) as srv:
        EdgePressClient(srv.url).upload_model(Pipe(data))  # type: ignore[arg-type]
    assert srv.requests[0]["headers"].get("Transfer-Encoding") == "chunked"
    assert srv.requests[0]["body"] == data


def test_list_jobs_follows_cursors() -> None:
    replies = [_json(200, {"items": [_job(id="job_a"), _job(id="job_b")], "next_cursor": "c1"}),
               _json(200, {"items": [_job(id="job_c")], "next_cursor": None})]
    with _Scripted(replies) as srv:
        ids = [j.id for j in EdgePressClient(srv.url).list_jobs(state="queued", page_size=2)]
    assert ids == ["job_a", "job_b", "job_c"]
    assert srv.requests[0]["path"] == "/v1/jobs?limit=2&state=queued"
    assert srv.requests[1]["path"] == "/v1/jobs?limit=2&state=queued&cursor=c1"


def test_wait_times_out_with_the_last_state() -> None:
    with _Scripted([_json(200, _job(state=JobState.running, stage="pass:x"))] * 20) as srv, \
            pytest.raises(EdgePressError) as info:
        EdgePressClient(srv.url).wait("job_1", poll=0.05, timeout=0.2)
    assert info.value.code == "wait_timeout" and "running" in info.value.detail


def test_wait_long_polls_with_the_records_etag_and_keeps_it_on_304() -> None:
    running = _job(state=JobState.running, stage="pass:x", progress=0.4)
    held = {"ETag": '"v1"', "Preference-Applied": "wait=20"}
    replies = [_json(200, running, ETag='"v1"'),
               lambda req: (304, held, b""),  # held, nothing changed
               _json(200, _job(state=JobState.succeeded, progress=1.0), ETag='"v2"',
                     **{"Preference-Applied": "wait=20"})]
    seen: list[Job] = []
    with _Scripted(replies) as srv:
        started = time.monotonic()
        job = EdgePressClient(srv.url).wait("job_1", poll=30, timeout=60,
                                            on_progress=seen.append)
    assert job.state is JobState.succeeded
    assert time.monotonic() - started < 20, "held answers are followed at once, not after poll"
    first, second, third = srv.requests
    assert "Prefer" not in first["headers"], "the first look is answered at once"
    assert second["headers"]["Prefer"] == "wait=20" and second["headers"]["If-None-Match"] == '"v1"'
    assert third["headers"]["If-None-Match"] == '"v1"', "a 304 keeps the tag the client holds"
    assert [j.state for j in seen] == [JobState.running, JobState.succeeded]


def test_wait_polls_at_its_pace_when_the_api_does_not_hold() -> None:
    replies = [_json(200, _job(state=JobState.running), ETag='"v1"'),
               _json(200, _job(state=JobState.running), ETag='"v1"'),  # not held (at bound)
               _json(200, _job(state=JobState.succeeded), ETag='"v2"')]
    with _Scripted(replies) as srv:
        started = time.monotonic()
        EdgePressClient(srv.url).wait("job_1", poll=0.3, timeout=60)
    assert len(srv.requests) == 3
    assert time.monotonic() - started >= 0.28, "`poll` is slept after the unheld answer"


# ---------------------------------------------------------------------------------------------
# Against the real stack


@pytest.fixture(scope="module")
def finished_job(live_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[EdgePressClient, Job, Path, list[Job]]]:
    from tests.models import write_mlp

    client = EdgePressClient(live_stack.api_url)
    source = write_mlp(tmp_path_factory.mktemp("client") / "mlp.onnx", inputs=128, hidden=512)
    model = client.upload_model(source)
    job = client.submit_job(model.id, recipe=[{"pass": "quantize_dynamic"}])
    seen: list[Job] = []
    done = client.wait(job.id, poll=0.2, timeout=240, on_progress=seen.append)
    yield client, done, source, seen


@pytest.mark.stack
def test_real_flow_typed_and_verified(finished_job: Any, tmp_path: Path) -> None:
    client, job, source, seen = finished_job
    assert job.state is JobState.succeeded, job.error
    assert seen[-1].state is JobState.succeeded and len(seen) >= 2
    model = client.get_model(job.model_id)
    assert model.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert model.id in {m.id for m in client.list_models()}
    path = client.download_artifact(job.id, "model.onnx", tmp_path, check_onnx=True)
    assert path == tmp_path / "model.onnx"
    assert path.stat().st_size == job.result["bytes_after"]  # type: ignore[index]
    assert set(client.list_artifacts(job.id)) >= {"model.onnx", "report.json", "report.html"}
    report = json.loads(client.download_artifact(job.id, "report.json", tmp_path).read_text())
    assert report["size"]["bytes_after"] == path.stat().st_size
    assert job.id in {j.id for j in client.list_jobs(state="succeeded")}


@pytest.mark.stack
def test_real_download_that_does_not_match_the_job_is_refused(finished_job: Any,
                                                              tmp_path: Path) -> None:
    client, job, _, _ = finished_job
    liar = job.model_copy(update={"result": {**job.result, "bytes_after": 12345}})
    with pytest.raises(EdgePressError) as info:
        client.download_artifact(job.id, "model.onnx", tmp_path / "m.onnx", job=liar)
    assert info.value.code == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == [], "a refused download must leave nothing behind"


@pytest.mark.stack
def test_real_presigned_upload_matches_the_direct_one(live_stack: Any, tmp_path: Path) -> None:
    from tests.models import write_mlp

    source = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=128, seed=7)
    # A tiny threshold sends this file through /v1/uploads (presigned POST to the store).
    via_store = EdgePressClient(live_stack.api_url, presigned_threshold=1024).upload_model(source)
    direct = EdgePressClient(live_stack.api_url, skip_stored_uploads=False).upload_model(
        source, presigned=False)
    assert via_store.id == direct.id
    assert via_store.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.stack
def test_real_second_upload_of_the_same_file_sends_nothing(live_stack: Any,
                                                          tmp_path: Path) -> None:
    from tests.models import write_mlp

    source = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=96, seed=11)
    calls: list[tuple[str, str]] = []
    session = requests.Session()
    session.hooks["response"].append(
        lambda r, *a, **k: calls.append((r.request.method, r.request.path_url)))
    client = EdgePressClient(live_stack.api_url, session=session)
    first = client.upload_model(source)
    assert [m for m, _ in calls] == ["GET", "POST"]  # not stored yet: looked up, then sent
    calls.clear()
    again = client.upload_model(source)
    assert calls == [("GET", f"/v1/models/{first.id}")]
    assert again == first


@pytest.mark.stack
def test_real_api_replays_a_repeated_idempotency_key(live_stack: Any, mlp_model: Path) -> None:
    client = EdgePressClient(live_stack.api_url)
    model = client.upload_model(mlp_model)
    body = {"model_id": model.id, "recipe": [{"pass": "quantize_dynamic"}]}
    key = {"Idempotency-Key": "test-" + os.urandom(8).hex()}
    first = client._request("POST", "/v1/jobs", json=body, headers=key).json()
    again = client._request("POST", "/v1/jobs", json=body, headers=key).json()
    assert first["id"] == again["id"], "a retried POST must not create a second job"
    client.cancel_job(first["id"])


@pytest.mark.stack
def test_real_errors_and_devices(live_stack: Any, tmp_path: Path) -> None:
    client = EdgePressClient(live_stack.api_url)
    with pytest.raises(EdgePressError) as info:
        client.get_job("job_doesnotexist")
    assert (info.value.status, info.value.code) == (404, "job_not_found")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x80\x04definitely a pickle")
    with pytest.raises(EdgePressError) as info:
        client.upload_model(bad)
    assert info.value.status in (415, 422)
    devices = client.list_devices()
    assert all(isinstance(d, DeviceProfile) for d in devices)
    assert "host" in {d.name for d in devices}
    assert client.get_device("raspberry_pi_5").architecture == "arm64"


# ---------------------------------------------------------------------------------------------
# Names the server supplies never choose where we write


@pytest.mark.parametrize("name", ["../escape.onnx", "/tmp/escape.onnx", "a/b.onnx", "..", ".",
                                  ".bashrc", "x\x00.onnx", "a\\b.onnx", ""])
def test_download_refuses_artifact_names_that_are_paths(tmp_path: Path, name: str) -> None:
    from service import cli

    out = tmp_path / "out"
    job = _job(state="succeeded", artifacts=["model.onnx", name])
    with _Scripted([_json(200, job)]) as server:
        code = cli.main(["--api", server.url, "download", "job_1", "-o", str(out)])
        assert code == cli.EXIT_UNREACHABLE  # a server answering nonsense
        assert [r["path"] for r in server.requests] == ["/v1/jobs/job_1"]  # nothing fetched
    assert list(tmp_path.rglob("*")) == []  # not even the output directory
    out.mkdir()
    with pytest.raises(EdgePressError) as info:
        EdgePressClient("http://127.0.0.1:9").download_artifact("job_1", name, out)
    assert info.value.code == "bad_response"  # before any request (the port is closed)
    assert list(tmp_path.rglob("*")) == [out]


def test_plain_artifact_names_pass() -> None:
    from service.client import safe_artifact_name

    for name in ("model.onnx", "report.json", "report.html", "model.onnx.zst"):
        assert safe_artifact_name(name) == name
