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
