"""SourceCache: content-addressed local copies of uploads on a worker."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from service.worker.source_cache import SourceCache


class _Origin:
    """Stands in for the object store's download: counts calls, writes the bytes it holds."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    def __call__(self, dest: Path) -> None:
        self.calls += 1
        dest.write_bytes(self.data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_second_fetch_is_a_copy_from_the_cache(tmp_path: Path) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    origin = _Origin(data)
    assert cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", origin) is False
    assert cache.fetch(_sha(data), len(data), tmp_path / "b.onnx", origin) is True
    assert origin.calls == 1
    assert (tmp_path / "b.onnx").read_bytes() == data


def test_jobs_get_copies_so_a_changed_input_never_reaches_the_next_job(tmp_path: Path) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    origin = _Origin(data)
    cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", origin)
    (tmp_path / "a.onnx").write_bytes(b"tampered by a job")  # e.g. a subverted engine
    cache.fetch(_sha(data), len(data), tmp_path / "b.onnx", origin)
    assert (tmp_path / "b.onnx").read_bytes() == data
    assert os.stat(tmp_path / "b.onnx").st_ino != os.stat(tmp_path / "cache" / _sha(data)).st_ino


def test_an_entry_of_the_wrong_size_is_not_used(tmp_path: Path) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / _sha(data)).write_bytes(data[:100])  # truncated by a crash
    origin = _Origin(data)
    assert cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", origin) is False
    assert origin.calls == 1 and (tmp_path / "a.onnx").read_bytes() == data
    assert (tmp_path / "cache" / _sha(data)).read_bytes() == data  # replaced whole


def test_a_download_that_does_not_match_the_record_is_refused_and_not_kept(tmp_path: Path) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(ValueError):
        cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", _Origin(data[:10]))
    assert not (tmp_path / "cache" / _sha(data)).exists()


def test_least_recently_used_entries_go_first_within_the_bound(tmp_path: Path) -> None:
    cache = SourceCache(tmp_path / "cache", 25_000)
    blobs = [os.urandom(10_000) for _ in range(3)]
    for i, blob in enumerate(blobs[:2]):
        cache.fetch(_sha(blob), len(blob), tmp_path / f"{i}.onnx", _Origin(blob))
    old = time.time() - 100
    os.utime(tmp_path / "cache" / _sha(blobs[0]), (old, old))
    os.utime(tmp_path / "cache" / _sha(blobs[1]), (old - 100, old - 100))  # used longest ago
    cache.fetch(_sha(blobs[2]), len(blobs[2]), tmp_path / "2.onnx", _Origin(blobs[2]))
    kept = {p.name for p in (tmp_path / "cache").iterdir()}
    assert kept == {_sha(blobs[0]), _sha(blobs[2])}
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 25_000


def test_off_or_too_big_means_always_downloaded(tmp_path: Path) -> None:
    data = os.urandom(5000)
    for cache in (SourceCache(tmp_path / "off", 0), SourceCache(tmp_path / "small", 100)):
        origin = _Origin(data)
        for name in ("a", "b"):
            assert cache.fetch(_sha(data), len(data), tmp_path / name, origin) is False
        assert origin.calls == 2
    assert not (tmp_path / "off").exists()
    assert not (tmp_path / "small").exists() or not any((tmp_path / "small").iterdir())


def test_an_entry_changed_on_disk_is_caught_by_its_hash_dropped_and_downloaded_again(
    tmp_path: Path,
) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    origin = _Origin(data)
    cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", origin)
    entry = tmp_path / "cache" / _sha(data)
    entry.write_bytes(bytes(len(data)))  # same size, other bytes: another tenant's job, a disk
    assert cache.fetch(_sha(data), len(data), tmp_path / "b.onnx", origin) is False
    assert origin.calls == 2 and (tmp_path / "b.onnx").read_bytes() == data
    assert entry.read_bytes() == data  # replaced by the verified download


def test_a_download_of_the_right_size_but_other_bytes_is_refused_and_not_kept(
    tmp_path: Path,
) -> None:
    data = os.urandom(5000)
    cache = SourceCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(ValueError, match="SHA-256"):
        cache.fetch(_sha(data), len(data), tmp_path / "a.onnx", _Origin(os.urandom(5000)))
    assert not (tmp_path / "cache" / _sha(data)).exists()
