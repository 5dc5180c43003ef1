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
