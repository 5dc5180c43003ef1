"""JobRunner in this process against the real store (the engine runs in its child process)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.jobs.models import Job, JobState, new_job_id, utcnow
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.storage.s3 import make_store
from service.tenants import DEFAULT_TENANT, tenant_prefix
from service.uploads.store import UploadStore
from service.worker.runner import JobRunner
from tests.models import write_mlp


def _setup(settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    store = make_store(settings).scoped(tenant_prefix(DEFAULT_TENANT))
    path = write_mlp(tmp_path / "m.onnx", inputs=128, hidden=256)
    data = path.read_bytes()
    record, _ = UploadStore(store).save_model(
        path, sha256=hashlib.sha256(data).hexdigest(), size=len(data), filename="m.onnx",
        description={"format": "onnx"},
    )
    jobs = JobStore(store)
    job = jobs.create(Job(id=new_job_id(), model_id=record.id, device="host",
                          recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow()))
    runner = JobRunner(settings, store, ServiceMetrics(), name="test-runner")
    return store, jobs, job, runner, record


def test_runs_a_job_once(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, jobs, job, runner, _ = _setup(isolated_settings, tmp_path)
    final = runner.run(job.id)
    assert final is not None and final.state is JobState.succeeded, final
    assert final.attempts == 1 and "model.onnx" in final.artifacts
    assert set(final.result["timings_s"]) >= {"download", "engine", "upload"}
    # A duplicate delivery of a finished job does nothing.
    again = runner.run(job.id)
    assert again is not None and again.state is JobState.succeeded and again.attempts == 1


def test_deleted_model_fails_precisely(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, jobs, job, runner, record = _setup(isolated_settings, tmp_path)
    UploadStore(store).delete_model(record.id)
    final = runner.run(job.id)
    assert final is not None and final.state is JobState.failed
    assert final.error is not None and final.error.code == "model_not_found"
