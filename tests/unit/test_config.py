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
    assert limits.engine.max_dataset_bytes == 2048
    assert limits.upload_bytes == {"model": 4096, "dataset": 2048}
    assert limits.request_bytes == 4096 + 1024 * 1024
    assert limits.job_rlimits["RLIMIT_DATA"] == (512 * 1024 * 1024,) * 2
    assert limits.job_rlimits["RLIMIT_CPU"] == (400, 405)
    assert limits.inspect_rlimits["RLIMIT_CPU"] == (7, 9) and limits.inspect_seconds == 12
    assert (limits.task_soft_seconds, limits.task_hard_seconds) == (220, 280)
    assert limits.redelivery_seconds > limits.task_hard_seconds > limits.job_hard_seconds


def test_model_limit_is_a_setting_past_2_gib() -> None:
    from service.config import limits_for

    limits = limits_for(Settings(max_model_bytes=8 * 1024**3))
    assert limits.engine.max_model_bytes == 8 * 1024**3  # not capped by protobuf's 2 GiB
    assert limits.upload_bytes["model"] == 8 * 1024**3  # the upload limit follows it
    assert limits.engine.max_uncompressed_bytes >= 8 * 1024**3  # an archive may hold it all
    assert limits.request_bytes > 8 * 1024**3
    both = limits_for(Settings(max_model_bytes=8 * 1024**3, max_upload_bytes=4096))
    assert both.upload_bytes["model"] == 4096 and both.engine.max_model_bytes == 8 * 1024**3
    assert limits_for(Settings(external_data_inline_bytes=123)).engine.external_data_inline_bytes == 123


def test_model_limit_defaults_to_the_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from service.config import MODEL_DISK_FACTOR, limits_for

    limits = limits_for(Settings(scratch_dir=str(tmp_path)))
    free = shutil.disk_usage(tmp_path).free
    # Free space moves as others write: within 5 % of a quarter of it.
    assert abs(limits.engine.max_model_bytes - free / MODEL_DISK_FACTOR) < 0.05 * free
    assert limits.upload_bytes["model"] == limits.engine.max_model_bytes


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
