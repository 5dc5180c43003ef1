"""Uploads are parsed in a child process that holds no credentials and has resource limits."""

import os
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
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # kept: numpy needs it on some CPUs
    env = _child_env("/scratch")
    assert "s3cret" not in env.values()
    assert "PATH" in env and env["TMPDIR"] == "/scratch"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"


def test_the_inspection_child_and_the_engine_share_one_allow_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.worker.isolation import engine_environment

    for name in ("PATH", "LANG", "OMP_NUM_THREADS", "EDGEPRESS_WEBHOOK_SECRET",
                 "EDGEPRESS_REDIS_URL", "OPENBLAS_CORETYPE"):
        monkeypatch.setenv(name, "x")
    inspection = {k: v for k, v in _child_env("/scratch").items() if k != "TMPDIR"}
    engine = {k: v for k, v in engine_environment(dict(os.environ)).items() if k != "TMPDIR"}
    assert inspection == engine
    assert "EDGEPRESS_WEBHOOK_SECRET" not in engine and "EDGEPRESS_REDIS_URL" not in engine


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


def test_no_preexec_fn_anywhere_in_the_api() -> None:
    # preexec_fn is not safe in a threaded server: the child sets its own limits instead.
    import service.api

    for source in Path(service.api.__file__).parent.glob("*.py"):
        assert "preexec_fn=" not in source.read_text(), source.name


def test_an_archive_expanding_past_the_free_scratch_space_is_refused_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A member of 3 MB in a tar, with only 1 MB of the scratch space free above the reserve.
    import io
    import shutil
    import tarfile

    from service.api import inspection

    data = mlp(inputs=512, hidden=1536).SerializeToString()  # ~3 MB
    archive = tmp_path / "m.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    free = shutil.disk_usage(scratch).free
    reserve = free - 1024 * 1024  # what is left above the reserve: 1 MB
    monkeypatch.setattr(inspection, "SCRATCH_RESERVE_BYTES", reserve)
    with pytest.raises(EngineError) as info_:
        inspect_in_child(MODEL, archive, "m.tar", EngineLimits(), Settings(scratch_dir=str(scratch)))
    assert info_.value.code in {"archive_too_large", "model_too_large", "invalid_archive"}, info_.value
    assert list(scratch.rglob("model.onnx")) == []


def test_a_full_process_answers_busy_instead_of_starting_another_child(tmp_path: Path) -> None:
    import threading

    from service.errors import Unavailable

    path = tmp_path / "m.onnx"
    path.write_bytes(mlp(inputs=8, hidden=8).SerializeToString())
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # one inspection running
    with pytest.raises(Unavailable) as info:
        inspect_in_child(MODEL, path, "m.onnx", EngineLimits(), Settings(), slots)
    assert info.value.code == "inspection_busy" and info.value.headers["Retry-After"] == "5"
    slots.release()
    assert inspect_in_child(MODEL, path, "m.onnx", EngineLimits(), Settings(), slots)["format"] == "onnx"
