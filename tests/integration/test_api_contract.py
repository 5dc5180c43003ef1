"""The app against its contract (api_spec/openapi.yaml), on the real S3 server and broker.

Every route the app serves is in the spec, and every response here validates against it.
"""

import io
import time

import numpy as np
import pytest

from tests.models import mlp
from tests.openapi import flask_rule_to_template, spec, validate_response

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack


@pytest.fixture
def checked(client):  # type: ignore[no-untyped-def]
    """The Flask test client, validating every response against the spec."""

    class Checked:
        def request(self, method: str, path: str, **kw):  # type: ignore[no-untyped-def]
            resp = client.open(path, method=method, **kw)
            body = resp.get_json(silent=True)
            validate_response(method, path, resp.status_code, resp.content_type, body)
            return resp

    return Checked()


def test_every_route_is_in_the_spec(app) -> None:  # type: ignore[no-untyped-def]
    paths = spec()["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        template = flask_rule_to_template(rule.rule)
        assert template in paths, f"{rule.rule} missing from api_spec/openapi.yaml"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[template], f"{method} {template} missing from the spec"


def _onnx_bytes() -> bytes:
    return mlp(inputs=32, hidden=64).SerializeToString()


def test_model_upload_flow(checked) -> None:  # type: ignore[no-untyped-def]
    data = _onnx_bytes()
    resp = checked.request("POST", "/v1/models?filename=m.onnx", data=data,
                           content_type="application/octet-stream")
    assert resp.status_code == 201
    model = resp.get_json()
    assert model["format"] == "onnx" and model["bytes"] == len(data)
    assert model["inputs"][0]["name"] == "x" and model["inputs"][0]["shape"] == ["N", 32]
    assert model["parameter_count"] == 32 * 64 + 64 + 64 * 10 + 10
    assert resp.headers["Location"].endswith(model["id"])
    # Same bytes again (multipart this time): same model, 200.
    again = checked.request("POST", "/v1/models", data={"file": (io.BytesIO(data), "m.onnx")},
                            content_type="multipart/form-data")
    assert again.status_code == 200 and again.get_json()["id"] == model["id"]
    assert checked.request("GET", f"/v1/models/{model['id']}").get_json()["sha256"] == model["sha256"]
    listing = checked.request("GET", "/v1/models").get_json()
    assert model["id"] in [m["id"] for m in listing["items"]]
    assert checked.request("DELETE", f"/v1/models/{model['id']}").status_code == 204
    assert checked.request("GET", f"/v1/models/{model['id']}").status_code == 404


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"\x00garbage bytes", 415, "not_onnx"),
        (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.", 415, "unsafe_format"),
    ],
)
def test_bad_uploads(checked, payload: bytes, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    resp = checked.request("POST", "/v1/models", data=payload, content_type="application/octet-stream")
    assert resp.status_code == status
    assert resp.get_json()["code"] == code


def test_empty_upload(checked) -> None:  # type: ignore[no-untyped-def]
    resp = checked.request("POST", "/v1/models", data=b"", content_type="application/octet-stream")
    assert resp.status_code == 422 and resp.get_json()["code"] == "empty_upload"


def test_upload_too_large(app, isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from service.api import create_app

    small = create_app(isolated_settings.model_copy(update={"max_upload_bytes": 2048}))
    client = small.test_client()
    resp = client.post("/v1/models", data=b"x" * 100_000, content_type="application/octet-stream")
    assert resp.status_code == 413
    validate_response("POST", "/v1/models", 413, resp.content_type, resp.get_json())
    assert resp.get_json()["code"] == "payload_too_large"


def test_job_submission_and_listing(checked) -> None:  # type: ignore[no-untyped-def]
    model = checked.request("POST", "/v1/models", data=_onnx_bytes(),
                            content_type="application/octet-stream").get_json()
    resp = checked.request("POST", "/v1/jobs", json={
        "model_id": model["id"], "device": "host", "recipe": [{"pass": "quantize_dynamic"}],
    })
    assert resp.status_code == 202
    job = resp.get_json()
    assert job["state"] == "queued" and job["progress"] == 0.0
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    second = checked.request("POST", "/v1/jobs", json={"model_id": model["id"], "recipe": "auto"}).get_json()
    page = checked.request("GET", "/v1/jobs?limit=1").get_json()
    assert [j["id"] for j in page["items"]] == [second["id"]]
    page2 = checked.request("GET", f"/v1/jobs?limit=1&cursor={page['next_cursor']}").get_json()
    assert [j["id"] for j in page2["items"]] == [job["id"]]
    # A queued job is cancelled at once.
    cancelled = checked.request("POST", f"/v1/jobs/{job['id']}/cancel").get_json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert checked.request("GET", f"/v1/jobs/{job['id']}/artifacts").get_json()["items"] == []
    assert checked.request("GET", f"/v1/jobs/{job['id']}/artifacts/model.onnx").status_code == 404
    assert checked.request("DELETE", f"/v1/jobs/{second['id']}").status_code == 409
    assert checked.request("DELETE", f"/v1/jobs/{job['id']}").status_code == 204


def test_job_status_is_conditional_and_long_polls(checked) -> None:  # type: ignore[no-untyped-def]
    model = checked.request("POST", "/v1/models", data=_onnx_bytes(),
                            content_type="application/octet-stream").get_json()
    job = checked.request("POST", "/v1/jobs", json={
        "model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}).get_json()
    first = checked.request("GET", f"/v1/jobs/{job['id']}")
    tag = first.headers["ETag"]
    assert tag.startswith('"') and "Preference-Applied" not in first.headers
    # Unchanged: 304 at once without Prefer, after the wait with it (nobody runs this queue).
    same = checked.request("GET", f"/v1/jobs/{job['id']}", headers={"If-None-Match": tag})
    assert same.status_code == 304 and same.headers["ETag"] == tag and not same.data
    started = time.monotonic()
    held = checked.request("GET", f"/v1/jobs/{job['id']}",
                           headers={"If-None-Match": tag, "Prefer": "respond-async, wait=1"})
    assert held.status_code == 304 and held.headers["Preference-Applied"] == "wait=1"
    assert time.monotonic() - started >= 0.9, "held for the requested second"
    # A tag the client no longer holds: the current record at once, even when asked to wait.
    other = checked.request("GET", f"/v1/jobs/{job['id']}",
                            headers={"If-None-Match": '"old"', "Prefer": "wait=30"})
    assert other.status_code == 200 and other.get_json()["id"] == job["id"]
    # Cancelling changes the record: a new tag, and a finished job is never held.
    checked.request("POST", f"/v1/jobs/{job['id']}/cancel")
    done = checked.request("GET", f"/v1/jobs/{job['id']}",
                           headers={"If-None-Match": tag, "Prefer": "wait=30"})
    assert done.status_code == 200 and done.get_json()["state"] == "cancelled"
    assert done.headers["ETag"] != tag


def test_long_poll_is_bounded_by_the_settings(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from service.api import create_app

    capped = create_app(isolated_settings.model_copy(update={"long_poll_max_seconds": 1}))
    client = capped.test_client()
    model = client.post("/v1/models", data=_onnx_bytes(),
                        content_type="application/octet-stream").get_json()
    job = client.post("/v1/jobs", json={"model_id": model["id"],
                                        "recipe": [{"pass": "quantize_dynamic"}]}).get_json()
    tag = client.get(f"/v1/jobs/{job['id']}").headers["ETag"]
    started = time.monotonic()
    resp = client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": tag, "Prefer": "wait=60"})
    assert resp.status_code == 304 and resp.headers["Preference-Applied"] == "wait=1"
    assert time.monotonic() - started < 30, "held for the configured 1 s, not the asked 60"
    never = create_app(isolated_settings.model_copy(update={"long_poll_max_waiters": 0}))
    resp = never.test_client().get(f"/v1/jobs/{job['id']}",
                                   headers={"If-None-Match": tag, "Prefer": "wait=60"})
    assert resp.status_code == 304 and "Preference-Applied" not in resp.headers


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model_id": "mdl_" + "0" * 32, "recipe": "auto"}, 404, "model_not_found"),
        ({"recipe": "auto"}, 422, "validation_error"),
    ],
)
def test_job_errors(checked, body, status, code) -> None:  # type: ignore[no-untyped-def]
    resp = checked.request("POST", "/v1/jobs", json=body)
    assert resp.status_code == status and resp.get_json()["code"] == code


def test_invalid_recipe_and_device(checked) -> None:  # type: ignore[no-untyped-def]
    model = checked.request("POST", "/v1/models", data=_onnx_bytes(),
                            content_type="application/octet-stream").get_json()
    resp = checked.request("POST", "/v1/jobs", json={"model_id": model["id"], "recipe": [{"pass": "magic"}]})
    assert resp.status_code == 422 and resp.get_json()["code"] == "unknown_pass"
    resp = checked.request("POST", "/v1/jobs", json={
        "model_id": model["id"], "recipe": [{"pass": "quantize_dynamic", "bogus_option": 1}]})
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_recipe"
    assert resp.get_json()["errors"][0]["field"].startswith("recipe[0]")
    resp = checked.request("POST", "/v1/jobs", json={"model_id": model["id"], "recipe": "auto",
                                                     "device": "toaster-9000"})
    assert resp.status_code == 422 and resp.get_json()["code"] == "unknown_device"


def test_dataset_upload_and_mismatch(checked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = checked.request("POST", "/v1/models", data=_onnx_bytes(),
                            content_type="application/octet-stream").get_json()
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((8, 32), np.float32), labels=np.arange(8))
    ds = checked.request("POST", "/v1/datasets?filename=good.npz", data=good.read_bytes(),
                         content_type="application/octet-stream")
    assert ds.status_code == 201
    assert ds.get_json()["samples"] == 8 and ds.get_json()["has_labels"] is True
    ok = checked.request("POST", "/v1/jobs", json={"model_id": model["id"], "recipe": "auto",
                                                   "dataset_id": ds.get_json()["id"]})
    assert ok.status_code == 202
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((8, 32), np.float32))
    ds2 = checked.request("POST", "/v1/datasets", data=wrong.read_bytes(),
                          content_type="application/octet-stream").get_json()
    bad = checked.request("POST", "/v1/jobs", json={"model_id": model["id"], "recipe": "auto",
                                                    "dataset_id": ds2["id"]})
    assert bad.status_code == 422 and bad.get_json()["code"] == "dataset_mismatch"
    shaped = checked.request("POST", "/v1/jobs", json={
        "model_id": model["id"], "recipe": "auto", "inputs": {"x": {"shape": [4, 32]}}})
    assert shaped.status_code == 202 and shaped.get_json()["inputs"] == {"x": {"shape": [4, 32]}}
    for inputs, field in (({"nope": {"shape": [1, 32]}}, "inputs.nope"),
                          ({"x": {"shape": [1, 31]}}, "inputs.x.shape")):
        refused = checked.request("POST", "/v1/jobs", json={
            "model_id": model["id"], "recipe": "auto", "inputs": inputs})
        assert refused.status_code == 422 and refused.get_json()["code"] == "invalid_inputs"
        assert refused.get_json()["errors"][0]["field"] == field
    pickled = checked.request("POST", "/v1/datasets", data=b"\x80\x04K\x01.",
                              content_type="application/octet-stream")
    assert pickled.status_code == 422 and pickled.get_json()["code"] == "invalid_dataset"


def test_operations_endpoints(checked) -> None:  # type: ignore[no-untyped-def]
    assert checked.request("GET", "/healthz").status_code == 200
    assert checked.request("GET", "/readyz").status_code == 200
    devices = checked.request("GET", "/v1/devices").get_json()["items"]
    assert len(devices) >= 12
    assert checked.request("GET", f"/v1/devices/{devices[0]['name']}").status_code == 200
    metrics = checked.request("GET", "/metrics")
    text = metrics.get_data(as_text=True)
    assert "edgepress_http_requests_total" in text and "edgepress_queue_depth" in text
