"""Uploads are parsed in a child process that holds no credentials and has resource limits."""

from pathlib import Path

import pytest

from service.api.inspection import _child_env, inspect_in_child
from service.config import Settings
from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from service.uploads.records import MODEL
from tests.models import mlp


def test_child_gets_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRESS_S3_SECRET_KEY", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    env = _child_env()
    assert "s3cret" not in env.values()
    assert "PATH" in env


def test_describes_a_model(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp(inputs=8, hidden=8).SerializeToString())
    desc = inspect_in_child(MODEL, path, "m.onnx", EngineLimits(), Settings())
    assert desc["inputs"][0]["name"] == "x" and desc["format"] == "onnx"


def test_memory_limit_is_a_precise_refusal(tmp_path: Path) -> None:
    path = tmp_path / "big.onnx"
    path.write_bytes(mlp(inputs=1024, hidden=2048).SerializeToString())  # ~8 MB
    tight = Settings(inspect_memory_limit_mb=128)
    with pytest.raises(EngineError) as info:
        inspect_in_child(MODEL, path, "big.onnx", EngineLimits(), tight)
    assert info.value.code in {"model_too_large", "invalid_model"}
    assert "memory" in info.value.message or "resources" in info.value.message


def test_exponential_functions_are_refused_by_the_child(tmp_path: Path) -> None:
    from tests.crafted import function_chain

    path = tmp_path / "bomb.onnx"
    path.write_bytes(function_chain(25, 2).SerializeToString())
    with pytest.raises(EngineError) as info:
        inspect_in_child(MODEL, path, "bomb.onnx", EngineLimits(), Settings(inspect_timeout_seconds=20))
    assert info.value.code == "model_too_large"
