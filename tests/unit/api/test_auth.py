"""The API fails closed: no keys is a start-up error unless ``EDGEPRESS_AUTH=open``; empty or
malformed key sets are start-up errors; the rate limiter refuses (503) when it cannot count.

The apps point at closed ports: nothing here needs a store or a broker.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service.api import create_app
from service.config import Settings

KEY = "key-for-acme-0123456789"


def offline(**over: Any) -> Settings:
    base: dict[str, Any] = {
        "s3_endpoint_url": "http://127.0.0.1:9",
        "broker_url": "redis://127.0.0.1:9/0",
        "s3_connect_timeout": 0.2,
        "s3_read_timeout": 0.2,
    }
    return Settings(**{**base, **over})


@pytest.fixture(autouse=True)
def _no_auth_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EDGEPRESS_AUTH", "EDGEPRESS_API_KEYS", "EDGEPRESS_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_no_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="EDGEPRESS_AUTH=open"):
        create_app(offline())


def test_no_keys_refuses_to_start_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRESS_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="no API keys"):
        create_app()
    monkeypatch.setenv("EDGEPRESS_AUTH", "open")
    assert create_app().test_client().get("/healthz").status_code == 200


def test_open_is_explicit_and_everything_is_the_default_tenant() -> None:
    client = create_app(offline(auth="open")).test_client()
    resp = client.get("/v1/devices")
    assert resp.status_code == 200


def test_auth_mode_is_validated() -> None:
    with pytest.raises(ValueError):
        offline(auth="none")


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_empty_key_list_in_the_environment_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("EDGEPRESS_API_KEYS", value)
    settings = offline()
    assert settings.api_keys is not None  # "" is set, not absent
    with pytest.raises(ValueError, match="holds no key"):
        create_app(settings)
    # Not even "open" makes an empty key set acceptable: the operator meant keys.
    with pytest.raises(ValueError, match="holds no key"):
        create_app(offline(auth="open", api_keys=SecretStr(value)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "non-empty JSON list"),
        ("{}", "non-empty JSON list"),
        ('{"tenant": "acme"}', "non-empty JSON list"),
        ("not json", "not valid JSON"),
        ('[{"tenant": "acme"}]', "each entry"),
        ('["acme"]', "each entry"),
        (json.dumps([{"tenant": "acme\n", "sha256": "0" * 64}]), "valid tenant"),
        (json.dumps([{"tenant": "acme", "sha256": "0" * 63}]), "valid tenant"),
    ],
)
def test_bad_keys_file_is_a_start_up_error(tmp_path: Path, content: str, message: str) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(content)
    with pytest.raises(ValueError, match=message):
        create_app(offline(api_keys_file=str(keys)))


def test_missing_or_blank_keys_file_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        create_app(offline(api_keys_file=str(tmp_path / "absent.json")))
    with pytest.raises(ValueError, match="names no file"):
        create_app(offline(api_keys_file=""))


def test_tenant_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="tenant:key"):
        create_app(offline(api_keys=SecretStr(f"acme\n:{KEY}")))


def test_open_with_keys_is_contradictory() -> None:
    with pytest.raises(ValueError, match="choose one"):
        create_app(offline(auth="open", api_keys=SecretStr(f"acme:{KEY}")))


def test_keys_file_alone_starts_and_requires_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"tenant": "acme", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]))
    client = create_app(offline(api_keys_file=str(keys), rate_limit_per_minute=0)).test_client()
    resp = client.get("/v1/devices")
    assert resp.status_code == 401 and resp.get_json()["code"] == "unauthorized"
    ok = client.get("/v1/devices", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_rate_limiter_fails_closed_when_redis_is_down() -> None:
    # The broker URL points at a closed port: the limiter cannot count, so it must refuse.
    client = create_app(offline(api_keys=SecretStr(f"acme:{KEY}"))).test_client()
    resp = client.get("/v1/devices", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["code"] == "rate_limiter_unavailable" and resp.headers["Retry-After"].isdigit()
    assert resp.mimetype == "application/problem+json"
    # A failed attempt is counted too, so it meets the same closed limiter.
    bad = client.get("/v1/devices", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 503
    # Liveness stays open and answers without the limiter.
    assert client.get("/healthz").status_code == 200
