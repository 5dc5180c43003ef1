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


def _quota_client(isolated_settings, quota: int):  # type: ignore[no-untyped-def]
    from service.api import create_app

    return create_app(isolated_settings.model_copy(
        update={"max_upload_bytes": 4096, "quota_stored_bytes": quota})).test_client()


def test_pending_presigned_uploads_count_against_the_quota(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    # Each pending upload reserves its size limit (4096) until completed or expired: a tenant
    # cannot park bytes in uploads it never completes.
    client = _quota_client(isolated_settings, 10_000)
    for _ in range(2):
        assert client.post("/v1/uploads", json={"kind": "model"}).status_code == 201
    third = client.post("/v1/uploads", json={"kind": "model"})
    assert third.status_code == 429 and third.get_json()["code"] == "quota_exceeded"
    assert "Retry-After" in third.headers


def test_artifacts_and_idempotency_records_count_against_the_quota(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from service.storage.s3 import make_store
    from service.tenants import DEFAULT_TENANT, tenant_prefix

    data = mlp(inputs=8, hidden=8, seed=41).SerializeToString()
    client = _quota_client(isolated_settings, 2 * len(data) + 2000)
    model = client.post("/v1/models", data=data, content_type="application/octet-stream",
                        headers={"Idempotency-Key": "k-41"})
    assert model.status_code == 201
    # What a job of this tenant left in its space (the worker writes artifacts there).
    space = make_store(isolated_settings).scoped(tenant_prefix(DEFAULT_TENANT))
    space.put("jobs/job_0123/artifacts/model.onnx", b"\x00" * len(data))
    assert space.total_bytes("idempotency/") > 0  # the key's record is counted too
    over = client.post("/v1/models", data=mlp(inputs=8, hidden=8, seed=42).SerializeToString(),
                       content_type="application/octet-stream")
    assert over.status_code == 429 and over.get_json()["code"] == "quota_exceeded", over.get_json()
    space.put("jobs/job_0123/artifacts/report.json", b"\x00" * 2000)  # now past the quota
    job = client.post("/v1/jobs", json={"model_id": model.get_json()["id"],
                                        "recipe": [{"pass": "quantize_dynamic"}]})
    assert job.status_code == 429 and job.get_json()["code"] == "quota_exceeded"


def test_uploads_never_completed_expire_from_the_real_store(isolated_settings, client) -> None:  # type: ignore[no-untyped-def]
    # Against the SeaweedFS the tests run: an upload whose data was sent but never completed
    # is deleted (record and data) once past its expiry and the grace; a fresh one stays. The
    # worker's reconciler runs the same expiry on every pass.
    import json
    from datetime import timedelta

    from service.jobs.record import utcnow
    from service.queue import JobQueue, create_celery_app
    from service.storage.s3 import make_store
    from service.tenants import DEFAULT_TENANT, tenant_prefix
    from service.uploads import incoming
    from service.worker.tasks import Reconciler

    space = make_store(isolated_settings).scoped(tenant_prefix(DEFAULT_TENANT))
    abandoned = client.post("/v1/uploads", json={"kind": "model"}).get_json()
    sent = requests.post(abandoned["url"], data=abandoned["fields"],
                         files={"file": ("x", b"abandoned bytes")}, timeout=30)
    assert sent.status_code in (200, 201, 204)
    fresh = client.post("/v1/uploads", json={"kind": "model"}).get_json()
    assert space.get(incoming.data_key(abandoned["id"])) is not None
    later = utcnow() + timedelta(seconds=isolated_settings.presign_ttl_seconds
                                 + incoming.GRACE_SECONDS + 1)
    assert incoming.expire(space, utcnow()) == []  # nothing is expired yet
    gone = incoming.expire(space, later)
    assert abandoned["id"] in gone and fresh["id"] in gone  # both are, by then
    assert space.list_keys("incoming/") == []
    assert client.post(abandoned["complete_url"]).status_code == 404
    # The reconciler's pass: a record two hours past its expiry, and data with no record.
    old = client.post("/v1/uploads", json={"kind": "model"}).get_json()
    record = json.loads(space.get(incoming.record_key(old["id"])).body)
    record["expires_at"] = (utcnow() - timedelta(hours=2)).isoformat()
    space.put(incoming.record_key(old["id"]), json.dumps(record).encode())
    space.put(incoming.data_key("upl_orphan"), b"no record")
    Reconciler(isolated_settings, make_store(isolated_settings),
               JobQueue(create_celery_app(isolated_settings), isolated_settings)).run_once()
    assert space.list_keys("incoming/") == []
