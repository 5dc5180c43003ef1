"""The object store against the real SeaweedFS S3 server."""

import pytest
import requests

from service.errors import PreconditionFailed
from service.storage.s3 import make_store

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack


@pytest.fixture
def store(isolated_settings):  # type: ignore[no-untyped-def]
    return make_store(isolated_settings)


def test_conditional_create_refuses_second_writer(store) -> None:  # type: ignore[no-untyped-def]
    store.put("k/a.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k/a.json", b"2", if_none_match=True)
    assert store.get("k/a.json").body == b"1"


def test_compare_and_swap_on_etag(store) -> None:  # type: ignore[no-untyped-def]
    etag = store.put("k/b.json", b"v1", if_none_match=True)
    new_etag = store.put("k/b.json", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put("k/b.json", b"v3", if_match=etag)  # stale
    store.put("k/b.json", b"v3", if_match=new_etag)
    assert store.get("k/b.json").body == b"v3"


def test_missing_object(store) -> None:  # type: ignore[no-untyped-def]
    assert store.get("nope") is None
    assert not store.exists("nope")


def test_streamed_file_roundtrip_and_presigned_url(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 4096 * 20  # 20 MiB: multipart upload
    src.write_bytes(payload)
    store.upload_file("blobs/x", src)
    dst = tmp_path / "out.bin"
    store.download_file("blobs/x", dst)
    assert dst.read_bytes() == payload
    url = store.presign_get("blobs/x", filename="x.bin")
    resp = requests.get(url, timeout=10, headers={"Range": "bytes=0-9"})
    assert resp.status_code in (200, 206) and resp.content[:10] == payload[:10]
    # Without the signature the object is not readable.
    assert requests.get(url.split("?")[0], timeout=10).status_code in (401, 403)


def test_listing_and_prefix_delete(store) -> None:  # type: ignore[no-untyped-def]
    for i in range(5):
        store.put(f"list/{i:02d}", b"x")
    assert store.list_keys("list/") == [f"list/{i:02d}" for i in range(5)]
    assert store.list_keys("list/", start_after="list/02", limit=2) == ["list/03", "list/04"]
    assert store.delete_prefix("list/") == 5
    assert store.list_keys("list/") == []
