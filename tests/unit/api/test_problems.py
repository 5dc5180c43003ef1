"""Error rendering: every error is RFC 9457 problem+json with a stable code.

These requests fail before any store or broker access, so the app needs no live stack.
"""

import pytest

from service.api import create_app
from service.config import Settings


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
