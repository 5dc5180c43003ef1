"""Hostile and malformed input through the HTTP API of the live stack.

Each case asserts the exact problem+json code (or failed-job code), that nothing was stored,
and that the service then serves the next request normally.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from tests.crafted import write_hostile_files
from tests.e2e.client import Api
from tests.models import mlp

pytestmark = pytest.mark.stack

STATUS = {"not_onnx": 415, "unsafe_format": 415, "model_too_large": 413}


@pytest.fixture(scope="module")
def api(live_stack) -> Api:  # type: ignore[no-untyped-def]
    return Api(live_stack.api_url)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[Path, str]]:  # type: ignore[no-untyped-def]
    return write_hostile_files(tmp_path_factory.mktemp("hostile"))


def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return sorted(write_hostile_files(Path(tmp)))


def assert_healthy(api: Api) -> None:
    assert api.request("GET", "/readyz").status_code == 200
    ok = api.request("POST", "/v1/models?filename=ok.onnx", data=mlp(inputs=8, hidden=8).SerializeToString(),
                     headers={"Content-Type": "application/octet-stream"})
    assert ok.status_code in (200, 201)


def not_stored(api: Api, data: bytes) -> None:
    model_id = "mdl_" + hashlib.sha256(data).hexdigest()[:32]
    assert api.request("GET", f"/v1/models/{model_id}").status_code == 404


def test_corpus_is_large_enough() -> None:
    assert len(_names()) >= 30


@pytest.mark.parametrize("name", _names())
def test_hostile_upload(api, hostile, name) -> None:  # type: ignore[no-untyped-def]
    path, code = hostile[name]
    data = path.read_bytes()
    resp = api.request("POST", f"/v1/models?filename={name}", data=data,
                       headers={"Content-Type": "application/octet-stream"})
    expected_status = 422 if name == "empty.onnx" else STATUS.get(code, 422)
    assert resp.status_code == expected_status, resp.text
    body = resp.json()
    assert body["code"] == ("empty_upload" if name == "empty.onnx" else code), body
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert "/tmp" not in body["detail"] and "Traceback" not in body["detail"]
    if data:
        not_stored(api, data)
    assert api.request("GET", "/healthz").status_code == 200


def test_oversized_body_refused_before_reading(api, live_stack) -> None:  # type: ignore[no-untyped-def]
    host, port = urlsplit(live_stack.api_url).hostname, urlsplit(live_stack.api_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 99999999999\r\nConnection: close\r\n\r\n" + b"\x00" * 1024)
        reply = sock.recv(4096).decode(errors="replace")
    assert " 413 " in reply.splitlines()[0]
    assert_healthy(api)


def test_truncated_upload_leaves_nothing(api, live_stack) -> None:  # type: ignore[no-untyped-def]
    before = {m["id"] for m in api.request("GET", "/v1/models?limit=100").json()["items"]}
    data = mlp(inputs=32, hidden=64, seed=77).SerializeToString()
    host, port = urlsplit(live_stack.api_url).hostname, urlsplit(live_stack.api_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.recv(4096)
    after = {m["id"] for m in api.request("GET", "/v1/models?limit=100").json()["items"]}
    assert after == before
    not_stored(api, data)
    not_stored(api, data[: len(data) // 2])
    assert_healthy(api)


def test_chunked_body_without_length(api, live_stack) -> None:  # type: ignore[no-untyped-def]
    data = mlp(inputs=32, hidden=64, seed=78).SerializeToString()

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    resp = requests.post(f"{live_stack.api_url}/v1/models?filename=chunked.onnx", data=chunks(),
                         headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert resp.status_code == 201, resp.text
    assert resp.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_chunked_garbage_without_length(api, live_stack) -> None:  # type: ignore[no-untyped-def]
    resp = requests.post(f"{live_stack.api_url}/v1/models", data=iter([b"\x01" * 5000, b"\x02" * 5000]),
                         headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert resp.status_code == 415 and resp.json()["code"] == "not_onnx"


@pytest.mark.parametrize("filename", ["мо\u0434ель-✓.onnx", "a" * 5000 + ".onnx", "../../etc/passwd",
                                      "x\u202e.onnx"])
def test_odd_filenames(api, filename) -> None:  # type: ignore[no-untyped-def]
    data = mlp(inputs=8, hidden=8, seed=len(filename) % 97).SerializeToString()
    resp = api.request("POST", "/v1/models", params={"filename": filename}, data=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code in (200, 201)
    stored = resp.json()["filename"]
    assert stored is None or ("/" not in stored and len(stored) <= 128)


def test_unicode_and_long_tensor_names(api) -> None:  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper

    name = "вход_" + "x" * 3000
    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    resp = api.request("POST", "/v1/models", data=model.SerializeToString(),
                       headers={"Content-Type": "application/octet-stream"})
    # A valid model (the engine's ingest accepts it): stored, not refused.
    assert resp.status_code in (201, 200), resp.text
    assert resp.json()["node_count"] == 1 and resp.json()["op_types"] == {"Relu": 1}
    assert_healthy(api)


# -- datasets ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_model(api) -> dict:  # type: ignore[no-untyped-def]
    data = mlp(inputs=256, hidden=512, seed=123).SerializeToString()
    return dict(api.request("POST", "/v1/models", data=data,
                            headers={"Content-Type": "application/octet-stream"}).json())


def _npz(tmp_path: Path, **arrays: np.ndarray) -> bytes:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


def test_dataset_pickle_disguised(api) -> None:  # type: ignore[no-untyped-def]
    import pickle

    resp = api.request("POST", "/v1/datasets", data=pickle.dumps({"x": [1, 2]}),
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_dataset"


def test_dataset_whose_header_lies_about_its_shape_refused(api) -> None:  # type: ignore[no-untyped-def]
    from tests.crafted import lying_npz

    resp = api.request("POST", "/v1/datasets", data=lying_npz((1 << 40,)),
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_dataset" and "declares shape" in resp.json()["detail"]
    assert_healthy(api)


def test_dataset_object_array_refused(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _npz(tmp_path, x=np.array([{"a": 1}, None], dtype=object))
    resp = api.request("POST", "/v1/datasets", data=data, headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_dataset"


def test_dataset_wrong_names(api, float_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _npz(tmp_path, image=np.zeros((8, 256), np.float32))
    ds = api.request("POST", "/v1/datasets", data=data, headers={"Content-Type": "application/octet-stream"}).json()
    resp = api.request("POST", "/v1/jobs", json={"model_id": float_model["id"], "dataset_id": ds["id"],
                                                  "recipe": [{"pass": "quantize_static"}]})
    assert resp.status_code == 422 and resp.json()["code"] == "dataset_mismatch"


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((8, 100), np.float32)},  # wrong shape
        {"x": np.zeros((8, 256), np.int64)},  # wrong dtype
    ],
    ids=["shape", "dtype"],
)
def test_dataset_wrong_shape_or_dtype_fails_job(api, float_model, tmp_path, arrays) -> None:  # type: ignore[no-untyped-def]
    ds = api.request("POST", "/v1/datasets", data=_npz(tmp_path, **arrays),
                     headers={"Content-Type": "application/octet-stream"}).json()
    job = api.submit(model_id=float_model["id"], dataset_id=ds["id"], recipe=[{"pass": "quantize_static"}])
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "failed" and done["error"]["code"] == "invalid_dataset", done.get("error")


def test_dataset_with_nan(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Refused at upload (the inspection checks every float array), before any job sees it."""
    x = np.zeros((8, 256), np.float32)
    x[3, 7] = np.nan
    resp = api.request("POST", "/v1/datasets", data=_npz(tmp_path, x=x),
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "invalid_dataset" and "NaN" in body["detail"], body


# -- what one job may spend ----------------------------------------------------------------------

def test_auto_asking_for_64_workers_gets_the_cores_and_one_memory_budget(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import os

    model = api.request("POST", "/v1/models?filename=w64.onnx",
                        data=mlp(inputs=256, hidden=512, seed=64).SerializeToString(),
                        headers={"Content-Type": "application/octet-stream"}).json()
    job = api.submit(model_id=model["id"], recipe="auto",
                     constraints={"workers": 64, "objective": "size"})
    done = api.wait(job["id"], timeout=400)
    assert done["state"] == "succeeded", done.get("error")
    # The engine ran isolated (this host has seccomp; where it lacks it the field says why).
    assert done["result"]["isolation"]["environment"] == "allow-list"
    assert done["result"]["isolation"]["network_filter"] == "seccomp"
    assert done["result"]["isolation"]["filesystem"].startswith("landlock abi ")  # kernel 6.18
    report = json.loads(api.download(job["id"], "report.json", tmp_path / "r.json").read_text())
    assert "memory_per_worker_bytes" in report["auto"], sorted(report["auto"])
    workers, share = report["auto"]["workers"], report["auto"]["memory_per_worker_bytes"]
    assert 1 <= workers <= len(os.sched_getaffinity(0))  # the stack's worker runs here
    if workers > 1:  # the engine and its candidates within the job's 4096 MiB together
        assert share is not None and (workers + 1) * share <= 4096 * 1024 * 1024
