"""Large uploads straight to the store with a presigned POST (size policy), then complete."""

import pytest
import requests

from tests.models import mlp
from tests.openapi import validate_response

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack


def test_presigned_model_upload(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/uploads", json={"kind": "model", "filename": "big.onnx"})
    assert resp.status_code == 201
    validate_response("POST", "/v1/uploads", 201, resp.content_type, resp.get_json())
    up = resp.get_json()
    # Completing before sending anything is a clear 409.
    early = client.post(up["complete_url"])
    assert early.status_code == 409 and early.get_json()["code"] == "upload_missing"
    data = mlp(inputs=64, hidden=128, seed=11).SerializeToString()
    sent = requests.post(up["url"], data=up["fields"], files={"file": ("big.onnx", data)}, timeout=30)
    assert sent.status_code in (200, 201, 204), sent.text
    done = client.post(up["complete_url"])
    assert done.status_code == 201, done.get_json()
    validate_response("POST", up["complete_url"], 201, done.content_type, done.get_json())
    model = done.get_json()
    assert model["bytes"] == len(data) and model["filename"] == "big.onnx"
    assert client.get(f"/v1/models/{model['id']}").status_code == 200
    # The temporary object is gone: completing again finds no upload.
    assert client.post(up["complete_url"]).status_code == 404


def test_presigned_policy_caps_size(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from service.api import create_app

    client = create_app(isolated_settings.model_copy(update={"max_upload_bytes": 4096})).test_client()
    up = client.post("/v1/uploads", json={"kind": "model"}).get_json()
    sent = requests.post(up["url"], data=up["fields"], files={"file": ("x", b"\x00" * 10_000)}, timeout=30)
    assert sent.status_code == 400 and "EntityTooLarge" in sent.text


def test_presigned_hostile_file_refused(client) -> None:  # type: ignore[no-untyped-def]
    up = client.post("/v1/uploads", json={"kind": "model"}).get_json()
    requests.post(up["url"], data=up["fields"], files={"file": ("x", b"\x80\x04K\x01.")}, timeout=30)
    resp = client.post(up["complete_url"])
    assert resp.status_code == 415 and resp.get_json()["code"] == "unsafe_format"
