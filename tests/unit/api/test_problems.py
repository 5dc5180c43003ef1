"""Error rendering: every error is RFC 9457 problem+json with a stable code.

These requests fail before any store or broker access, so the app needs no live stack.
"""

import pytest

from service.api import create_app
from service.config import Settings
from tests.openapi import validate_response


@pytest.fixture
def offline_client():  # type: ignore[no-untyped-def]
    # Points at a closed port: any store access would fail, so these tests prove the
    # errors come from validation alone.
    app = create_app(Settings(s3_endpoint_url="http://127.0.0.1:9", broker_url="redis://127.0.0.1:9/0",
                              s3_connect_timeout=0.2, s3_read_timeout=0.2, auth="open"))
    return app.test_client()


def test_unknown_route_is_problem_json(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.get("/v1/nope")
    assert resp.status_code == 404
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json()
    assert body["code"] == "not_found" and body["status"] == 404 and body["title"] == "Not Found"


def test_invalid_job_spec_names_the_field(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.post("/v1/jobs", json={"model_id": "mdl_x", "recipe": 5})
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["code"] == "validation_error"
    assert any(e["field"].startswith("recipe") for e in body["errors"])


def test_unknown_field_refused(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.post("/v1/jobs", json={"model_id": "m", "recipe": "auto", "colour": "red"})
    assert resp.status_code == 422
    assert any(e["field"] == "colour" for e in resp.get_json()["errors"])


def test_non_json_body(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.post("/v1/jobs", data=b"not json", content_type="application/json")
    assert resp.status_code == 422
    assert resp.get_json()["code"] == "validation_error"


def test_store_down_is_503_with_retry_after(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.get("/v1/models/mdl_" + "0" * 32)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"].isdigit()
    body = resp.get_json()
    assert body["code"] == "store_unavailable"
    assert "127.0.0.1" not in body["detail"]  # no endpoints leaked


def test_readyz_reports_unavailable(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {"store": "unavailable", "broker": "unavailable"}


def test_bad_limit(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.get("/v1/jobs?limit=0")
    assert resp.status_code == 422
    assert resp.get_json()["errors"][0]["field"] == "limit"


def test_large_json_body_is_413_before_it_is_read(offline_client) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model_id": "m", "recipe": "auto", "pad": "' + b"x" * (2 << 20) + b'"}'
    resp = offline_client.post("/v1/jobs", data=body, content_type="application/json")
    assert resp.status_code == 413 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["code"] == "payload_too_large"
    validate_response("POST", "/v1/jobs", 413, resp.content_type, resp.get_json())
    # The same with an Idempotency-Key (its wrapper reads the body first).
    resp = offline_client.post("/v1/jobs", data=body, content_type="application/json",
                               headers={"Idempotency-Key": "big-1"})
    assert resp.status_code == 413 and resp.get_json()["code"] == "payload_too_large"


def test_json_limit_is_a_setting_and_uploads_keep_theirs() -> None:
    app = create_app(Settings(s3_endpoint_url="http://127.0.0.1:9", broker_url="redis://127.0.0.1:9/0",
                              s3_connect_timeout=0.2, s3_read_timeout=0.2, auth="open",
                              max_json_body_bytes=4096))
    client = app.test_client()
    pad = "x" * 5000
    resp = client.post("/v1/uploads", json={"kind": "model", "filename": pad})
    assert resp.status_code == 413 and resp.get_json()["code"] == "payload_too_large"
    # Uploads are streamed to disk under the upload limit, not the JSON one.
    upload = client.post("/v1/models", data=b"\x00" * 8192, content_type="application/octet-stream")
    assert upload.status_code != 413, upload.get_json()


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deep_json_is_400_not_500(offline_client, depth: int) -> None:  # type: ignore[no-untyped-def]
    nested = "[" * depth + "]" * depth
    body = '{"model_id": "m", "recipe": "auto", "device": {"x": ' + nested + "}}"
    resp = offline_client.post("/v1/jobs", data=body, content_type="application/json")
    assert resp.status_code == 400 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["code"] == "json_too_deep"
    validate_response("POST", "/v1/jobs", 400, resp.content_type, resp.get_json())


def test_json_within_the_depth_limit_reaches_validation(offline_client) -> None:  # type: ignore[no-untyped-def]
    nested: object = 1
    for _ in range(20):
        nested = {"k": nested}
    resp = offline_client.post("/v1/jobs", json={"model_id": "m", "recipe": 5, "device": nested})
    assert resp.status_code == 422 and resp.get_json()["code"] == "validation_error"


def test_json_body_without_json_content_type(offline_client) -> None:  # type: ignore[no-untyped-def]
    resp = offline_client.post("/v1/jobs", data=b'{"model_id": "m", "recipe": "auto"}',
                               content_type="text/plain")
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "body"
