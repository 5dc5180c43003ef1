import pytest
from pydantic import ValidationError

from service.config import Settings


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRESS_S3_BUCKET", "my-bucket")
    monkeypatch.setenv("EDGEPRESS_MAX_UPLOAD_BYTES", "4096")
    monkeypatch.setenv("EDGEPRESS_S3_SECRET_KEY", "s3cr3t")
    settings = Settings()
    assert settings.s3_bucket == "my-bucket"
    assert settings.max_upload_bytes == 4096
    assert settings.s3_secret_key is not None
    assert "s3cr3t" not in repr(settings)  # secrets never printed


def test_rejects_invalid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRESS_MAX_UPLOAD_BYTES", "12")
    with pytest.raises(ValidationError):
        Settings()


def test_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.s3_bucket = "other"  # type: ignore[misc]


def test_limits_come_from_the_settings() -> None:
    from service.config import limits_for

    settings = Settings(max_upload_bytes=4096, max_dataset_bytes=2048, job_time_limit=100,
                        job_memory_limit_mb=512, inspect_timeout_seconds=7)
    limits = limits_for(settings, cpus=4)
    assert limits.engine.max_model_bytes == 4096 and limits.engine.max_dataset_bytes == 2048
    assert limits.upload_bytes == {"model": 4096, "dataset": 2048}
    assert limits.request_bytes == 4096 + 1024 * 1024
    assert limits.job_rlimits["RLIMIT_AS"] == (512 * 1024 * 1024,) * 2
    assert limits.job_rlimits["RLIMIT_CPU"] == (400, 405)
    assert limits.inspect_rlimits["RLIMIT_CPU"] == (7, 9) and limits.inspect_seconds == 12
    assert (limits.task_soft_seconds, limits.task_hard_seconds) == (220, 280)
    assert limits.redelivery_seconds > limits.task_hard_seconds > limits.job_hard_seconds
    # The engine never takes a model protobuf cannot serialise, whatever the upload limit.
    big = limits_for(Settings(max_upload_bytes=8 * 1024**3)).engine
    assert big.max_model_bytes == 2_000_000_000


def test_gunicorn_reads_its_settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import runpy
    from pathlib import Path

    import service.api

    monkeypatch.setenv("EDGEPRESS_BIND", "0.0.0.0:9999")
    monkeypatch.setenv("EDGEPRESS_API_WORKERS", "3")
    monkeypatch.setenv("EDGEPRESS_API_THREADS", "5")
    monkeypatch.setenv("EDGEPRESS_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "stale.db").write_bytes(b"")
    conf = runpy.run_path(str(Path(service.api.__file__).parent / "gunicorn_conf.py"))
    assert (conf["bind"], conf["workers"], conf["threads"]) == ("0.0.0.0:9999", 3, 5)
    assert (conf["timeout"], conf["graceful_timeout"], conf["loglevel"]) == (120, 30, "debug")
    conf["on_starting"](None)
    assert not (tmp_path / "stale.db").exists()
