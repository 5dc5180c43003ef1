"""Datasets: .npz only, never unpickled, validated against the model's inputs."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.engine.dataset import inspect_dataset, load_dataset
from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from tests import crafted


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _code(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(EngineError) as info:
        fn(*args, **kwargs)
    return info.value.code


def test_inspect_describes_arrays_and_labels(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", x=np.zeros((20, 64), np.float32),
             labels=np.arange(20) % 10)
    d = inspect_dataset(p)
    assert d == {"arrays": {"x": {"shape": [20, 64], "dtype": "float32"},
                            "labels": {"shape": [20], "dtype": "int64"}},
                 "samples": 20, "has_labels": True}


def test_inspect_refuses_bad_files(tmp_path: Path) -> None:
    (tmp_path / "not.npz").write_bytes(b"hello")
    assert _code(inspect_dataset, tmp_path / "not.npz") == "invalid_dataset"
    np.save(tmp_path / "single.npy", np.zeros(3))
    assert _code(inspect_dataset, tmp_path / "single.npy") == "invalid_dataset"
    # Object arrays need pickle: refused, and never unpickled.
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, None]
    np.savez(tmp_path / "obj.npz", x=obj)
    assert _code(inspect_dataset, tmp_path / "obj.npz") == "invalid_dataset"
    bad = _npz(tmp_path / "ragged.npz", x=np.zeros((3, 2)), y=np.zeros((4, 2)))
    assert _code(inspect_dataset, bad) == "invalid_dataset"
    nan = np.zeros((3, 2))
    nan[1, 1] = np.nan
    assert _code(inspect_dataset, _npz(tmp_path / "nan.npz", x=nan)) == "invalid_dataset"
    labels = _npz(tmp_path / "labels.npz", x=np.zeros((3, 2)), labels=np.zeros(3) + 0.5)
    assert _code(inspect_dataset, labels) == "invalid_dataset"
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as zf:
        zf.writestr("evil.pkl", b"\x80\x04.")
    assert _code(inspect_dataset, tmp_path / "other.npz") == "invalid_dataset"


def test_inspect_refuses_bombs_and_oversize(tmp_path: Path) -> None:
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, x=np.zeros((4096, 1024), np.float32))  # 16 MB of zeros, ~16 KB
    assert _code(inspect_dataset, p) == "invalid_dataset"
    p = _npz(tmp_path / "big.npz", x=np.ones((100, 100), np.float32))
    assert _code(inspect_dataset, p, EngineLimits(max_dataset_bytes=1000)) == "invalid_dataset"


def test_load_matches_model_inputs(tmp_path: Path) -> None:
    model = crafted.mlp()
    p = _npz(tmp_path / "d.npz", x=np.ones((8, 64)), labels=np.arange(8))  # float64 on disk
    inputs, labels = load_dataset(p, model)
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (8, 64)
    assert labels is not None and labels.dtype == np.int64
    # [samples, 1, features] for a batch-1 style model is squeezed.
    p = _npz(tmp_path / "d3.npz", x=np.ones((8, 1, 64), np.float32))
    inputs, labels = load_dataset(p, model)
    assert inputs["x"].shape == (8, 64) and labels is None


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [({"wrong": np.ones((4, 64), np.float32)}, "named after the model inputs"),
     ({"x": np.ones((4, 32), np.float32)}, "shape"),
     ({"x": np.ones((4, 64, 2), np.float32)}, "rank"),
     ({"x": np.ones((4, 64), np.int64)}, "dtype"),
     ({"x": np.ones((4, 64), np.float32), "extra": np.ones((4,))}, "named after")],
)
def test_load_refuses_mismatches(tmp_path: Path, arrays: dict, fragment: str) -> None:
    p = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(EngineError) as info:
        load_dataset(p, crafted.mlp())
    assert info.value.code == "invalid_dataset"
    assert fragment in info.value.message


def test_load_integer_inputs(tmp_path: Path) -> None:
    model = crafted.dynamic_dims()
    p = _npz(tmp_path / "ids.npz", ids=np.arange(40, dtype=np.int32).reshape(4, 10))
    inputs, _ = load_dataset(p, model)
    assert inputs["ids"].dtype == np.int64 and inputs["ids"].shape == (4, 10)
    p = _npz(tmp_path / "f.npz", ids=np.ones((4, 10), np.float32))
    assert _code(load_dataset, p, model) == "invalid_dataset"


def test_samples_of_the_input_shape_any_batch_axis_and_scalars(tmp_path: Path) -> None:
    from service.engine.evaluate import dataset_feeds
    from tests import real_exports

    model = real_exports.reflect_audio(hidden=16, channels=8)  # wave[b, t], sr[], state[1, b, 16]
    n = 5
    p = _npz(tmp_path / "a.npz", wave=np.ones((n, 1, 2000), np.float32),
             sr=np.full(n, 16000), state=np.zeros((n, 1, 1, 16), np.float32))
    inputs, _ = load_dataset(p, model)
    assert inputs["state"].shape == (n, 1, 1, 16) and inputs["sr"].shape == (n,)
    feeds, _ = dataset_feeds(model, inputs, None, 10)
    assert len(feeds) == n
    assert feeds[0]["wave"].shape == (1, 2000) and feeds[0]["state"].shape == (1, 1, 16)
    assert feeds[0]["sr"].shape == () and int(feeds[0]["sr"]) == 16000
    # Rows along the batch axis mix with [N, *input_shape] for the others.
    p = _npz(tmp_path / "b.npz", wave=np.ones((n, 2000), np.float32), sr=np.full(n, 16000),
             state=np.zeros((n, 1, 1, 16), np.float32))
    inputs, _ = load_dataset(p, model)
    assert dataset_feeds(model, inputs, None, 1)[0][0]["wave"].shape == (1, 2000)
    # The state with its batch folded into axis 0 (the old layout) is refused, naming it.
    p = _npz(tmp_path / "c.npz", wave=np.ones((n, 2000), np.float32), sr=np.full(n, 16000),
             state=np.zeros((n, 16), np.float32))
    with pytest.raises(EngineError) as info:
        load_dataset(p, model)
    assert info.value.code == "invalid_dataset"
    assert "'state'" in info.value.message and "[N, 1, ?, 16]" in info.value.message


def test_fixed_batch_datasets_are_fed_one_sample_at_a_time(tmp_path: Path) -> None:
    from service.engine.evaluate import dataset_feeds
    from tests import real_exports

    model = real_exports.fixed_batch_cnn()
    x = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    for arr in (x, x[:, None]):  # [N, *input_shape] or rows along the batch axis
        inputs, labels = load_dataset(_npz(tmp_path / "d.npz", x=arr, labels=np.arange(20) % 10),
                                      model)
        feeds, chunks = dataset_feeds(model, inputs, labels, 100)
        assert len(feeds) == 20 and all(f["x"].shape == (1, 3, 32, 32) for f in feeds)
        assert chunks is not None and [int(c[0]) for c in chunks[:3]] == [0, 1, 2]
    with pytest.raises(EngineError) as info:
        load_dataset(_npz(tmp_path / "e.npz", x=x[:, :, :16]), model)
    assert "[N, 1, 3, 32, 32]" in info.value.message


@pytest.mark.parametrize("shape", [(1 << 40,), (1 << 20, 1 << 20), (3,)])
def test_an_npz_whose_header_lies_about_its_shape_is_refused_before_allocating(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    import resource
    import time

    from tests.crafted import lying_npz

    path = tmp_path / "lies.npz"
    path.write_bytes(lying_npz(shape))  # claims 4 TiB, 4 TiB or 12 bytes; holds 16 bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        inspect_dataset(path)
    assert info.value.code == "invalid_dataset" and "declares shape" in info.value.message
    assert time.monotonic() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
