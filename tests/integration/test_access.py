"""API keys, tenant isolation, rate limits, quotas and idempotency on the real store and Redis."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service import webhooks
from service.api import create_app
from tests.models import mlp
from tests.openapi import validate_response

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack

KEY_A, KEY_B = "key-for-acme-0123456789", "key-for-globex-0123456789"


@pytest.fixture
def keyed_app(isolated_settings, tmp_path):  # type: ignore[no-untyped-def]
    return keyed(isolated_settings, tmp_path)


def keyed(isolated_settings, tmp_path, **update):  # type: ignore[no-untyped-def]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([
        {"tenant": "globex", "name": "ci", "sha256": hashlib.sha256(KEY_B.encode()).hexdigest()},
    ]))
    settings = isolated_settings.model_copy(update={
        "api_keys_file": str(keys_file), "quota_concurrent_jobs": 2,
        "rate_limit_per_minute": 0, "auth": "keys",
    })
    # model_copy skips validation: SecretStr must be built explicitly.
    from pydantic import SecretStr

    return create_app(settings.model_copy(update={"api_keys": SecretStr(f"acme:{KEY_A}"),
                                                   **update}))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_required_and_tenants_isolated(keyed_app) -> None:  # type: ignore[no-untyped-def]
    c = keyed_app.test_client()
    resp = c.get("/v1/jobs")
    assert resp.status_code == 401 and resp.get_json()["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    validate_response("GET", "/v1/jobs", 401, resp.content_type, resp.get_json())
    assert c.get("/v1/jobs", headers=auth("wrong")).status_code == 401
    assert c.get("/healthz").status_code == 200  # open
    data = mlp(inputs=16, hidden=32).SerializeToString()
    model = c.post("/v1/models", data=data, content_type="application/octet-stream",
                   headers=auth(KEY_A)).get_json()
    assert c.get(f"/v1/models/{model['id']}", headers=auth(KEY_A)).status_code == 200
    other = c.get(f"/v1/models/{model['id']}", headers=auth(KEY_B))
    assert other.status_code == 404 and other.get_json()["code"] == "model_not_found"
    job = c.post("/v1/jobs", json={"model_id": model["id"], "recipe": "auto"}, headers=auth(KEY_A)).get_json()
    assert c.get(f"/v1/jobs/{job['id']}", headers=auth(KEY_B)).status_code == 404
    assert c.get("/v1/jobs", headers=auth(KEY_B)).get_json()["items"] == []
    # Globex cannot submit a job on acme's model either.
    assert c.post("/v1/jobs", json={"model_id": model["id"], "recipe": "auto"},
                  headers=auth(KEY_B)).status_code == 404


def test_concurrent_job_quota(keyed_app) -> None:  # type: ignore[no-untyped-def]
    c = keyed_app.test_client()
    data = mlp(inputs=16, hidden=32, seed=3).SerializeToString()
    model = c.post("/v1/models", data=data, content_type="application/octet-stream",
                   headers=auth(KEY_A)).get_json()
    body = {"model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}
    for _ in range(2):
        assert c.post("/v1/jobs", json=body, headers=auth(KEY_A)).status_code == 202
    over = c.post("/v1/jobs", json=body, headers=auth(KEY_A))
    assert over.status_code == 429 and over.get_json()["code"] == "quota_exceeded"
    assert int(over.headers["Retry-After"]) > 0
    validate_response("POST", "/v1/jobs", 429, over.content_type, over.get_json())


def test_storage_quota(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    c = create_app(isolated_settings.model_copy(update={"quota_stored_bytes": 50_000})).test_client()
    first = mlp(inputs=16, hidden=32).SerializeToString()
    assert c.post("/v1/models", data=first, content_type="application/octet-stream").status_code == 201
    big = mlp(inputs=64, hidden=256).SerializeToString()
    resp = c.post("/v1/models", data=big, content_type="application/octet-stream")
    assert resp.status_code == 429 and resp.get_json()["code"] == "quota_exceeded"


def test_rate_limit_per_key(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    settings = isolated_settings.model_copy(update={
        "api_keys": SecretStr(f"acme:rl-{isolated_settings.s3_prefix[-8:]}"), "rate_limit_per_minute": 5,
        "auth": "keys",
    })
    c = create_app(settings).test_client()
    # Another app instance shares the counter through Redis (as API replicas do).
    c2 = create_app(settings).test_client()
    key = {"Authorization": f"Bearer rl-{isolated_settings.s3_prefix[-8:]}"}
    # Windows are fixed minutes: start early in one, so that all 7 requests fall in it.
    if time.time() % 60 > 50:
        time.sleep(60 - time.time() % 60 + 0.2)
    statuses = [c.get("/v1/devices", headers=key).status_code for _ in range(3)]
    statuses += [c2.get("/v1/devices", headers=key).status_code for _ in range(4)]
    # Exactly the first 5 pass: an API that refused everything, or did not share the count
    # between replicas (the second app would answer 200 four times), fails.
    assert statuses == [200] * 5 + [429] * 2, statuses
    last = c2.get("/v1/devices", headers=key)
    assert last.get_json()["code"] == "rate_limited" and int(last.headers["Retry-After"]) >= 1


def test_failed_attempts_are_counted_and_limited(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    key = f"good-{isolated_settings.s3_prefix[-8:]}"
    settings = isolated_settings.model_copy(update={
        "api_keys": SecretStr(f"acme:{key}"), "rate_limit_per_minute": 4, "auth": "keys",
    })
    c = create_app(settings).test_client()
    # A guesser from one address (its own, so other tests' counters are not shared).
    guess = {"REMOTE_ADDR": f"198.51.100.{int(isolated_settings.s3_prefix[-2:], 16) % 250}"}
    statuses = [c.get("/v1/devices", headers={"Authorization": f"Bearer guess-{i}"},
                      environ_base=guess).status_code for i in range(6)]
    assert statuses[:4] == [401] * 4 and statuses[4:] == [429, 429]
    last = c.get("/v1/devices", environ_base=guess)  # no key at all counts as a failure too
    assert last.status_code == 429 and last.get_json()["code"] == "rate_limited"
    assert int(last.headers["Retry-After"]) >= 1
    # The valid key is not limited by the guesser's failures.
    assert c.get("/v1/devices", headers={"Authorization": f"Bearer {key}"},
                 environ_base=guess).status_code == 200


def test_idempotency_key(client) -> None:  # type: ignore[no-untyped-def]
    data = mlp(inputs=16, hidden=32, seed=5).SerializeToString()
    model = client.post("/v1/models", data=data, content_type="application/octet-stream").get_json()
    body = {"model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}
    h = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/jobs", json=body, headers=h)
    again = client.post("/v1/jobs", json=body, headers=h)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(client.get("/v1/jobs").get_json()["items"]) == 1
    other = client.post("/v1/jobs", json={**body, "recipe": "auto"}, headers=h)
    assert other.status_code == 409 and other.get_json()["code"] == "idempotency_key_reused"
    # Errors are remembered too (4xx): same key, same bad body -> same 404.
    bad = {"model_id": "mdl_" + "9" * 32, "recipe": "auto"}
    r1 = client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": "k2"})
    r2 = client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": "k2"})
    assert r1.status_code == r2.status_code == 404
    # Uploads: same key + other bytes -> 409.
    up = {"Idempotency-Key": "upload-1"}
    assert client.post("/v1/models", data=data, content_type="application/octet-stream", headers=up).status_code == 200
    other_bytes = mlp(inputs=16, hidden=32, seed=6).SerializeToString()
    resp = client.post("/v1/models", data=other_bytes, content_type="application/octet-stream", headers=up)
    assert resp.status_code == 409


def test_concurrent_same_key_creates_one_job(client) -> None:  # type: ignore[no-untyped-def]
    data = mlp(inputs=16, hidden=32, seed=7).SerializeToString()
    model = client.post("/v1/models", data=data, content_type="application/octet-stream").get_json()
    body = {"model_id": model["id"], "recipe": [{"pass": "quantize_dynamic"}]}
    results: list[tuple[int, str | None]] = []

    def post() -> None:
        r = client.application.test_client().post("/v1/jobs", json=body, headers={"Idempotency-Key": "race"})
        results.append((r.status_code, (r.get_json() or {}).get("id")))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = {job_id for status, job_id in results if status == 202}
    assert len(created) == 1
    assert all(status in (202, 409) for status, _ in results)
    assert len(client.get("/v1/jobs").get_json()["items"]) == 1


@pytest.mark.parametrize(
    "url",
    ["http://example.com/hook", "https://10.1.2.3/hook", "https://169.254.169.254/latest",
     "https://[::1]:9/x", "ftp://example.com/", "https://user:pw@example.com/"],
)
def test_callback_urls_refused(isolated_settings, url) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    settings = isolated_settings.model_copy(
        update={"webhook_secret": SecretStr("s"), "webhook_allow_loopback_http": False}
    )
    client = create_app(settings).test_client()
    data = mlp(inputs=16, hidden=32, seed=8).SerializeToString()
    model = client.post("/v1/models", data=data, content_type="application/octet-stream").get_json()
    resp = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": "auto", "callback_url": url})
    assert resp.status_code == 422 and resp.get_json()["code"] == "invalid_callback_url"
    assert "not enabled" not in resp.get_json()["detail"]


def test_public_https_callback_accepted(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    settings = isolated_settings.model_copy(
        update={"webhook_secret": SecretStr("s"), "webhook_allow_hosts": "hooks.example.test,127.0.0.0/8"}
    )
    webhooks.check_callback_url("https://127.0.0.1:8443/hook", settings)  # allow-listed CIDR
    with pytest.raises(webhooks.CallbackRefused):
        webhooks.check_callback_url("http://127.0.0.1:8443/hook", settings)  # http needs the loopback flag


def test_signature_roundtrip() -> None:
    body = b'{"event":"job.succeeded"}'
    headers = webhooks.sign("s3cret", body)
    assert webhooks.verify("s3cret", body, headers["X-EdgePress-Signature"])
    assert not webhooks.verify("other", body, headers["X-EdgePress-Signature"])
    assert not webhooks.verify("s3cret", body + b" ", headers["X-EdgePress-Signature"])
    old = webhooks.sign("s3cret", body, timestamp=1)["X-EdgePress-Signature"]
    assert not webhooks.verify("s3cret", body, old)  # replay outside the tolerance


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    fail_first = 0

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Receiver.fail_first > 0:
            _Receiver.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        _Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def test_webhook_delivered_signed_and_retried(live_stack, receiver) -> None:  # type: ignore[no-untyped-def]
    """On the live stack: the terminal-state webhook arrives signed, after a failed attempt."""

    from tests.e2e.client import Api

    api = Api(live_stack.api_url)
    _Receiver.fail_first = 1
    model = api.request("POST", "/v1/models", data=mlp(inputs=64, hidden=256, seed=9).SerializeToString(),
                        headers={"Content-Type": "application/octet-stream"}).json()
    job = api.submit(model_id=model["id"], recipe=[{"pass": "quantize_dynamic"}], callback_url=receiver)
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded"
    deadline = time.monotonic() + 30
    while not _Receiver.received and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _Receiver.received, "webhook never arrived"
    headers, body = _Receiver.received[0]
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job"]["id"] == job["id"]
    operator = live_stack.env["EDGEPRESS_WEBHOOK_SECRET"]
    secret = webhooks.tenant_secret(operator, "default")  # signed with the tenant's own secret
    assert webhooks.verify(secret, body, headers["X-EdgePress-Signature"])
    assert not webhooks.verify(operator, body, headers["X-EdgePress-Signature"])


def test_each_tenant_reads_its_own_webhook_secret(keyed_app, isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    c = keyed_app.test_client()
    off = c.get("/v1/webhook-secret", headers=auth(KEY_A))
    assert off.status_code == 404 and off.get_json()["code"] == "webhooks_not_enabled"
    validate_response("GET", "/v1/webhook-secret", 404, off.content_type, off.get_json())
    on = keyed(isolated_settings, tmp_path,
               webhook_secret=SecretStr("operator-secret")).test_client()
    assert on.get("/v1/webhook-secret").status_code == 401
    acme = on.get("/v1/webhook-secret", headers=auth(KEY_A))
    globex = on.get("/v1/webhook-secret", headers=auth(KEY_B)).get_json()
    validate_response("GET", "/v1/webhook-secret", 200, acme.content_type, acme.get_json())
    assert acme.get_json() == {"tenant": "acme",
                               "secret": webhooks.tenant_secret("operator-secret", "acme")}
    assert globex["tenant"] == "globex" and globex["secret"] != acme.get_json()["secret"]
    body = b'{"event":"job.succeeded"}'
    signed = webhooks.sign(acme.get_json()["secret"], body)["X-EdgePress-Signature"]
    assert not webhooks.verify(globex["secret"], body, signed)
