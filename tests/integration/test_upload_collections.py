"""Models and datasets through the one upload path, on the real store: both collections list
alike (pages, tenants), and bytes already stored are answered without a second inspection or
quota check, whichever the kind."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import SecretStr

from service.api import create_app
from tests.models import mlp
from tests.openapi import validate_response

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack

KEY_A, KEY_B = "kinds-acme-0123456789", "kinds-globex-0123456789"


def _onnx(seed: int) -> bytes:
    return mlp(inputs=8, hidden=8, seed=seed).SerializeToString()


def _npz(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    np.savez(buf, x=rng.standard_normal((4, 8)).astype(np.float32), labels=np.arange(4))
    return buf.getvalue()


FILES: dict[str, Callable[[int], bytes]] = {"models": _onnx, "datasets": _npz}


def _get(client, path: str, **kw):  # type: ignore[no-untyped-def]
    resp = client.get(path, **kw)
    validate_response("GET", path, resp.status_code, resp.content_type, resp.get_json(silent=True))
    return resp


def _post(client, folder: str, data: bytes, **kw):  # type: ignore[no-untyped-def]
    path = f"/v1/{folder}"
    resp = client.post(path, data=data, content_type="application/octet-stream", **kw)
    validate_response("POST", path, resp.status_code, resp.content_type, resp.get_json(silent=True))
    return resp


@pytest.mark.parametrize("folder", sorted(FILES))
def test_listing_pages_through_every_upload(client, folder: str) -> None:  # type: ignore[no-untyped-def]
    ids = set()
    for seed in range(3):
        resp = _post(client, folder, FILES[folder](seed))
        assert resp.status_code == 201, resp.get_json()
        ids.add(resp.get_json()["id"])
    everything = _get(client, f"/v1/{folder}").get_json()
    assert {r["id"] for r in everything["items"]} == ids and everything["next_cursor"] is None
    # In id order, two at a time: the cursor is the last id of the page.
    first = _get(client, f"/v1/{folder}?limit=2").get_json()
    assert [r["id"] for r in first["items"]] == sorted(ids)[:2]
    assert first["next_cursor"] == sorted(ids)[1]
    rest = _get(client, f"/v1/{folder}?limit=2&cursor={first['next_cursor']}").get_json()
    assert [r["id"] for r in rest["items"]] == sorted(ids)[2:] and rest["next_cursor"] is None
    for bad in ("limit=0", "limit=101", "limit=x", "cursor=" + "c" * 513):
        refused = _get(client, f"/v1/{folder}?{bad}")
        assert refused.status_code == 422, bad
    # A deleted upload leaves the listing.
    gone = sorted(ids)[0]
    assert client.delete(f"/v1/{folder}/{gone}").status_code == 204
    assert gone not in {r["id"] for r in _get(client, f"/v1/{folder}").get_json()["items"]}


@pytest.mark.parametrize("folder", sorted(FILES))
def test_listing_is_per_tenant(isolated_settings, folder: str) -> None:  # type: ignore[no-untyped-def]
    settings = isolated_settings.model_copy(update={"auth": "keys", "rate_limit_per_minute": 0})
    c = create_app(settings.model_copy(update={
        "api_keys": SecretStr(f"acme:{KEY_A},globex:{KEY_B}")})).test_client()
    acme, globex = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    assert _get(c, f"/v1/{folder}").status_code == 401
    mine = _post(c, folder, FILES[folder](7), headers=acme).get_json()
    listed = _get(c, f"/v1/{folder}", headers=acme).get_json()
    assert [r["id"] for r in listed["items"]] == [mine["id"]]
    assert _get(c, f"/v1/{folder}", headers=globex).get_json() == {"items": [], "next_cursor": None}
    # The same bytes from the other tenant are its own upload (201), listed only there.
    theirs = _post(c, folder, FILES[folder](7), headers=globex)
    assert theirs.status_code == 201 and theirs.get_json()["id"] == mine["id"]
    assert c.delete(f"/v1/{folder}/{mine['id']}", headers=globex).status_code == 204
    assert [r["id"] for r in _get(c, f"/v1/{folder}", headers=acme).get_json()["items"]] == [mine["id"]]


@pytest.mark.parametrize("folder", sorted(FILES))
def test_stored_bytes_are_not_inspected_or_counted_again(isolated_settings, monkeypatch,
                                                         folder: str) -> None:  # type: ignore[no-untyped-def]
    import service.api.uploads as uploads_api

    data = FILES[folder](11)
    c = create_app(isolated_settings.model_copy(update={"quota_stored_bytes": len(data) + 10})).test_client()
    first = _post(c, folder, data)
    assert first.status_code == 201
    inspected: list[str] = []
    real = uploads_api.inspect_in_child
    monkeypatch.setattr(uploads_api, "inspect_in_child",
                        lambda kind, *a: inspected.append(kind.name) or real(kind, *a))
    # The tenant is at its quota: the same bytes again are the stored record (200), not a 429,
    # and nobody parses them a second time.
    again = _post(c, folder, data)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"] == f"/v1/{folder}/{first.get_json()['id']}"
    assert inspected == []
    # New bytes are counted (429 over the quota) before they are inspected.
    over = _post(c, folder, FILES[folder](12))
    assert over.status_code == 429 and over.get_json()["code"] == "quota_exceeded"
    assert inspected == []


def test_an_archive_expanding_past_the_api_scratch_space_is_refused(
    isolated_settings, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Through the HTTP API: a tar.gz whose 3 MB member fits every configured limit but not the
    # scratch space this API has free (1 MB above the reserve, here): refused before expanding.
    import gzip
    import io
    import shutil
    import tarfile

    from service.api import inspection

    data = mlp(inputs=512, hidden=1536, seed=31).SerializeToString()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(inspection, "SCRATCH_RESERVE_BYTES",
                        shutil.disk_usage(scratch).free - 1024 * 1024)
    c = create_app(isolated_settings.model_copy(update={"scratch_dir": str(scratch)})).test_client()
    resp = c.post("/v1/models?filename=m.tar.gz", data=gzip.compress(buf.getvalue()),
                  content_type="application/octet-stream")
    assert resp.status_code in (413, 422), resp.get_json()
    body = resp.get_json()
    assert body["code"] in ("invalid_archive", "model_too_large"), body
    assert body["details"]["limit"] < len(data), body
    assert list(scratch.rglob("model.onnx")) == []


def test_a_process_inspecting_all_it_may_answers_503_with_retry_after(isolated_settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(isolated_settings)
    slots = app.extensions["edgepress"].inspections
    slots.acquire()  # this process's one inspection is running
    resp = app.test_client().post("/v1/models?filename=m.onnx", data=mlp(inputs=8, hidden=8, seed=32)
                                  .SerializeToString(), content_type="application/octet-stream")
    assert resp.status_code == 503 and resp.get_json()["code"] == "inspection_busy"
    assert resp.headers["Retry-After"] == "5"
    slots.release()
