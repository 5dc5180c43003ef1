"""JobRunner in this process against the real store (the engine runs in its child process)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from service.jobs.record import Job, JobState, new_job_id, utcnow
from service.jobs.store import JobStore, artifact_key
from service.metrics import ServiceMetrics
from service.storage.s3 import make_store
from service.tenants import DEFAULT_TENANT, tenant_prefix
from service.uploads.records import MODEL
from service.uploads.store import UploadStore
from service.worker.artifacts import JobArtifacts, artifact_path
from service.worker.runner import JobRunner
from tests.models import write_mlp

# Every test here talks to the live stack's S3 server / broker (fixtures in tests/conftest.py).
pytestmark = pytest.mark.stack


def _setup(settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    store = make_store(settings).scoped(tenant_prefix(DEFAULT_TENANT))
    path = write_mlp(tmp_path / "m.onnx", inputs=128, hidden=256)
    data = path.read_bytes()
    record, _ = UploadStore(store).save(
        MODEL, path, sha256=hashlib.sha256(data).hexdigest(), size=len(data), filename="m.onnx",
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


def test_the_engine_gets_the_operators_limits(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A ~140 KB model under an operator's 64 KiB model limit: the engine itself refuses it
    # (with EngineLimits' defaults, as before the spec carried limits, it would succeed). The
    # model limit is its own setting (the upload limit follows it, not the other way round).
    tight = isolated_settings.model_copy(update={"max_model_bytes": 64 * 1024})
    _, _, job, _, _ = _setup(tight, tmp_path)
    final = JobRunner(tight, make_store(tight).scoped(tenant_prefix(DEFAULT_TENANT)),
                      ServiceMetrics(), name="tight-runner").run(job.id)
    assert final is not None and final.state is JobState.failed, final
    assert final.error is not None and final.error.code == "model_too_large", final.error


def test_deleted_model_fails_precisely(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, jobs, job, runner, record = _setup(isolated_settings, tmp_path)
    UploadStore(store).delete(MODEL, record.id)
    final = runner.run(job.id)
    assert final is not None and final.state is JobState.failed
    assert final.error is not None and final.error.code == "model_not_found"


def test_stored_model_is_the_engine_output_announced_early(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    store, _, job, runner, _ = _setup(isolated_settings, tmp_path)
    final = runner.run(job.id)
    assert final is not None and final.state is JobState.succeeded, final
    assert final.artifacts == sorted(final.artifacts)
    assert set(final.artifacts) >= {"model.onnx", "report.json", "report.html"}
    out = tmp_path / "out.onnx"
    store.download_file(artifact_key(job.id, "model.onnx"), out)
    assert out.stat().st_size == final.result["bytes_after"]
    assert final.result["timings_s"]["upload_during_engine"] > 0, "stored while evaluated"
    onnx.checker.check_model(str(out))


def test_early_artifacts_of_a_job_that_does_not_succeed_are_removed(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, _, job, _, _ = _setup(isolated_settings, tmp_path)
    workdir = tmp_path / "work"
    (workdir / "engine").mkdir(parents=True)
    model = workdir / "engine" / "model.onnx"
    model.write_bytes(b"compressed bytes")
    early = JobArtifacts(store, job.id, workdir)
    early.announce("model.onnx", str(model))
    assert early.wait_announced() == ["model.onnx"]
    assert store.exists(artifact_key(job.id, "model.onnx"))
    early.discard()
    early.close()
    assert not store.exists(artifact_key(job.id, "model.onnx"))


def test_engine_cannot_hand_out_files_outside_its_workdir(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, _, job, _, _ = _setup(isolated_settings, tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("worker credentials")
    (workdir / "link.onnx").symlink_to(secret)
    (workdir / "real.onnx").write_bytes(b"x")
    for name, raw in [("model.onnx", str(secret)), ("model.onnx", str(workdir / "link.onnx")),
                      ("model.onnx", str(workdir / ".." / "secret.txt")),
                      ("model.onnx", "real.onnx"),  # relative: refused, never resolved
                      ("evil.sh", str(workdir / "real.onnx"))]:
        with pytest.raises(ValueError):
            artifact_path(workdir, name, raw)
    assert artifact_path(workdir, "model.onnx", str(workdir / "real.onnx")) == \
        (workdir / "real.onnx").resolve()
    # Announced early, a refused path is ignored (nothing stored), and the final outcome
    # naming it is refused as a whole.
    early = JobArtifacts(store, job.id, workdir)
    early.announce("model.onnx", str(secret))
    assert early.wait_announced() == []
    with pytest.raises(ValueError):
        early.store({"report.json": str(secret)})
    early.close()
    assert not store.exists(artifact_key(job.id, "model.onnx"))
    assert not store.exists(artifact_key(job.id, "report.json"))


def test_a_model_seen_before_is_not_downloaded_again(isolated_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, jobs, job, runner, record = _setup(isolated_settings, tmp_path)
    first = runner.run(job.id)
    again = jobs.create(Job(id=new_job_id(), model_id=record.id, device="host",
                            recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow()))
    second = runner.run(again.id)
    assert first is not None and second is not None
    assert second.state is JobState.succeeded, second
    assert second.result["inputs_from_worker_cache"] == 1
    assert second.result["bytes_after"] == first.result["bytes_after"]
    off = JobRunner(isolated_settings.model_copy(update={"worker_source_cache_mb": 0}),
                    runner.store, ServiceMetrics(), name="test-runner")
    third = jobs.create(Job(id=new_job_id(), model_id=record.id, device="host",
                            recipe=[{"pass": "quantize_dynamic"}], created_at=utcnow()))
    final = off.run(third.id)
    assert final is not None and final.result["inputs_from_worker_cache"] == 0


def test_engine_server_gets_the_huge_pages_tunable_and_the_worker_does_not() -> None:
    import os
    from multiprocessing import forkserver

    from service.worker.engine_host import start_engine_server

    start_engine_server(huge_pages=True)
    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert any(e.startswith(b"GLIBC_TUNABLES=") and b"glibc.malloc.hugetlb=1" in e
               for e in environ)
    assert "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")


def test_unexpected_engine_error_is_logged_with_its_traceback(isolated_settings, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """An engine failure that is no EngineError reaches the job as internal_error naming only
    the exception type, and the worker log as the whole traceback with the job id."""
    import json
    import logging

    _, _, job, runner, _ = _setup(isolated_settings, tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    model = write_mlp(workdir / "m.onnx", inputs=16, hidden=16)
    # A limits entry EngineLimits does not know: pydantic raises inside the engine, outside
    # every pass (what a bug there looks like).
    (workdir / "spec.json").write_text(json.dumps({
        "workdir": str(workdir), "model_path": str(model), "dataset_path": None,
        "recipe": [{"pass": "quantize_dynamic"}], "device": "host", "constraints": {},
        "limits": {"no_such_limit": 1}}))
    runner._heartbeat = lambda *args: job  # the record stays ours (not claimed in this test)
    with caplog.at_level(logging.ERROR, logger="service.worker.engine_host"):
        outcome = runner._run_engine(job.id, workdir)
    assert outcome.get("ok") is False, outcome
    assert outcome["error"]["code"] == "internal_error"
    assert "Traceback" not in outcome["error"]["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert job.id in logged and "Traceback (most recent call last)" in logged
    assert "ValidationError" in logged and "no_such_limit" in logged


def test_referenced_models_are_fetched_by_the_worker_and_the_engine_holds_no_secret(
    isolated_settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # An extra teacher by id: the worker fetches it from the job's tenant space before the
    # engine starts (the engine has no store client and none of the worker's credentials);
    # a teacher id of another tenant is not found, the engine says so.
    store, jobs, _, runner, record = _setup(isolated_settings, tmp_path)
    other = make_store(isolated_settings).scoped(tenant_prefix("other"))
    their_path = write_mlp(tmp_path / "theirs.onnx", inputs=128, hidden=256, seed=1)
    their_bytes = their_path.read_bytes()
    theirs, _ = UploadStore(other).save(
        MODEL, their_path, sha256=hashlib.sha256(their_bytes).hexdigest(), size=len(their_bytes),
        filename="theirs.onnx", description={"format": "onnx"})

    import numpy as np

    from service.engine.limits import EngineLimits
    from service.uploads.records import UPLOAD_KINDS

    data_path = tmp_path / "d.npz"
    np.savez(data_path, x=np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32))
    kind = UPLOAD_KINDS["dataset"]
    raw = data_path.read_bytes()
    dataset, _ = UploadStore(store).save(
        kind, data_path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), filename="d.npz",
        description=kind.inspector(data_path, "d.npz", EngineLimits()))

    def distill_job(teacher: str) -> Job:
        return jobs.create(Job(
            id=new_job_id(), model_id=record.id, device="host", created_at=utcnow(),
            dataset_id=dataset.id,
            recipe=[{"pass": "distill", "teachers": [{"model_id": teacher}],
                     "budget": {"max_steps": 2}}, {"pass": "quantize_dynamic"}]))

    final = runner.run(distill_job(record.id).id)
    assert final is not None and final.state is JobState.succeeded, final.error
    isolation = final.result["isolation"]
    assert isolation["environment"] == "allow-list"
    assert isolation["network_filter"] == "seccomp" and isolation["network_namespace"] != ""
    # Landlock where the kernel has it (this training pass imports torch after the restriction).
    from service.worker.isolation import _libc, landlock_abi

    abi = landlock_abi(_libc())
    assert isolation["filesystem"] == (f"landlock abi {abi}" if abi >= 1 else
                                       f"unavailable: {os.strerror(-abi)}")
    final = runner.run(distill_job(theirs.id).id)
    assert final is not None and final.state is JobState.failed
    assert final.error is not None and final.error.code in ("model_not_found", "invalid_recipe")
    assert theirs.id in final.error.message
