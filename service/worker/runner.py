"""``JobRunner``: runs one job, start to finish, from its id: the job's lifecycle on the
worker.

Idempotent: it re-reads the record, returns early when the job is finished or being run by a
live worker, and claims it (``lifecycle.claim``). It fetches the inputs (``SourceCache``),
runs the engine in its own process (``engine_host``: limits, time limits, progress), streams
progress into the record as heart-beats, honours cancellation, stores the artifacts
(``artifacts``) and writes the terminal state.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import Settings, limits_for
from service.engine.devices import parse_device
from service.errors import NotFound, Unavailable
from service.jobs import lifecycle
from service.jobs.events import JobEvents
from service.jobs.record import Job, JobState
from service.jobs.store import JobStore
from service.metrics import ServiceMetrics
from service.storage.s3 import S3ObjectStore
from service.uploads.records import DATASET, MODEL
from service.uploads.store import UploadStore
from service.worker.artifacts import JobArtifacts
from service.worker.engine_host import run_engine
from service.worker.source_cache import SourceCache

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: S3ObjectStore,
        metrics: ServiceMetrics,
        name: str | None = None,
        tenant: str = "default",
    ) -> None:
        """``store`` is the tenant's space (``tenants/<tenant>/``) of the object store."""
        self.settings = settings
        self.tenant = tenant
        self.store = store
        self.jobs = JobStore(store, JobEvents.from_settings(settings))
        self.uploads = UploadStore(store)
        self.metrics = metrics
        self.name = name or worker_name()
        self.scratch = Path(settings.scratch_dir or tempfile.gettempdir())
        self.sources = SourceCache(
            self.scratch / "edgepress-source-cache", settings.worker_source_cache_mb * 1024 * 1024
        )

    # -- running -----------------------------------------------------------------------------
    def run(self, job_id: str) -> Job | None:
        """Run job ``job_id`` if it is ours to run; returns the final record (or None)."""
        s = self.settings
        try:
            claim = lifecycle.claim(self.jobs, job_id, self.name, max_attempts=s.job_max_attempts,
                                    stale_seconds=s.job_stale_seconds)
        except NotFound:
            log.warning("job %s has no record; dropping the message", job_id)
            return None
        claimed = claim.job
        if claimed.state is not JobState.running or claimed.worker != self.name:
            if claim.ended:  # cancelled or worker_lost by this claim: count it once
                self._finished(claimed)
            return claimed
        started = time.monotonic()
        self.metrics.worker_in_progress.inc()
        try:
            final = self._execute(claimed)
        except Unavailable:
            # The store is unreachable: nothing can be recorded now. The task retries with
            # backoff and this worker re-claims its own job (or the reconciler hands it on).
            raise
        except NotFound as exc:  # the model or dataset was deleted after the job was queued
            final = lifecycle.fail(self.jobs, job_id, exc.code, exc.message)
        except Exception as exc:  # a bug: fail the job, keep the worker
            log.exception("job %s failed in the worker", job_id)
            final = lifecycle.fail(
                self.jobs,
                job_id,
                "internal_error",
                f"the worker failed while running the job ({type(exc).__name__})",
            )
        finally:
            self.metrics.worker_in_progress.dec()
            self.metrics.worker_busy.inc(time.monotonic() - started)
        self._finished(final)
        return final

    def _execute(self, job: Job) -> Job:
        workdir = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self.scratch))
        artifacts = JobArtifacts(self.store, job.id, workdir)
        try:
            model = self.uploads.get(MODEL, job.model_id)
            suffix = _source_suffix(model.format, model.filename)
            model_path = workdir / "input" / f"model{suffix}"
            model_path.parent.mkdir()
            timings: dict[str, float] = {}
            clock = time.monotonic()
            hits = [self.sources.fetch(model.sha256, model.bytes, model_path,
                                lambda p: self.store.download_file(MODEL.blob_key(model.id), p))]
            dataset_path = None
            if job.dataset_id:
                dataset = self.uploads.get(DATASET, job.dataset_id)
                dataset_path = workdir / "input" / "data.npz"
                hits.append(self.sources.fetch(
                    dataset.sha256, dataset.bytes, dataset_path,
                    lambda p: self.store.download_file(DATASET.blob_key(dataset.id), p)))
            refs = self._fetch_referenced(job, workdir / "refs", hits)
            device = parse_device(job.device).model_dump(mode="json")
            spec = {
                "workdir": str(workdir),
                "model_path": str(model_path),
                "dataset_path": str(dataset_path) if dataset_path else None,
                "recipe": job.recipe,
                "device": device,
                "constraints": job.constraints,
                "inputs": job.inputs,
                "refs": refs,
                # Without it the engine would run under EngineLimits' defaults.
                "limits": limits_for(self.settings).engine.model_dump(mode="json"),
            }
            (workdir / "spec.json").write_text(json.dumps(spec))
            timings["download"] = time.monotonic() - clock
            clock = time.monotonic()
            outcome = self._run_engine(job.id, workdir, timings, artifacts.announce)
            timings["engine"] = time.monotonic() - clock
            if outcome.get("lost"):
                artifacts.abandon()  # the job is another worker's now: its artifacts, not ours
                return self.jobs.get(job.id)
            if outcome.get("cancelled"):
                artifacts.discard()
                return lifecycle.mark_cancelled(self.jobs, job.id)
            if not outcome.get("ok"):
                artifacts.discard()
                err = outcome.get("error") or {}
                return lifecycle.fail(
                    self.jobs,
                    job.id,
                    err.get("code", "internal_error"),
                    err.get("message", "the engine failed"),
                    err.get("details"),
                )
            clock = time.monotonic()
            try:
                # The stage is recorded meanwhile; its outcome is moot (the final write checks
                # ownership again).
                names = artifacts.store(outcome["artifacts"],
                                        meanwhile=lambda: self._heartbeat(job.id, "upload", 0.98))
            except ValueError as exc:  # the engine named a file it may not hand out
                artifacts.discard()
                log.error("job %s: %s", job.id, exc)
                return lifecycle.fail(self.jobs, job.id, "internal_error",
                                      "the engine's output was refused")
            timings["upload"] = time.monotonic() - clock
            if artifacts.seconds:
                timings["upload_during_engine"] = artifacts.seconds
            summary = outcome.get("summary") or {}
            # Where the worker's time went (engine stages as the engine reported them).
            summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            summary["inputs_from_worker_cache"] = sum(hits)  # not downloaded: seen before
            summary["isolation"] = outcome.get("isolation")
            return lifecycle.succeed(self.jobs, job.id, self.name, result=summary, artifacts=names)
        finally:
            artifacts.close()  # no upload may still be reading the workdir
            shutil.rmtree(workdir, ignore_errors=True)

    def _fetch_referenced(self, job: Job, directory: Path, hits: list[bool]) -> dict[str, str]:
        """The other uploaded models the recipe reads (teachers, students), from the job's
        tenant space, by id -> local path: the engine reads them from there (it has no store).
        An id that names no model of this tenant is left out; the engine says model_not_found."""
        from service.engine.registry import referenced_models

        refs: dict[str, str] = {}
        for model_id in referenced_models(job.recipe):
            try:
                record = self.uploads.get(MODEL, model_id)
            except NotFound:
                continue
            directory.mkdir(exist_ok=True)
            target = directory / f"{record.id}.onnx"
            key = MODEL.blob_key(record.id)
            hits.append(self.sources.fetch(record.sha256, record.bytes, target,
                                           functools.partial(self.store.download_file, key)))
            refs[model_id] = str(target)
        return refs

    def _run_engine(
        self,
        job_id: str,
        workdir: Path,
        timings: dict[str, float] | None = None,
        on_artifact: Callable[[str, str], None] | None = None,
    ) -> dict[str, Any]:
        """The engine's outcome for the spec in ``workdir``, or ``{"cancelled": True}`` /
        ``{"lost": True}`` when it was stopped because the job was cancelled / is no longer
        ours. Stage and progress reach the record every ``progress_interval_seconds`` (at
        least every ``job_heartbeat_seconds``), engine stage durations ``timings``."""
        s = self.settings
        durations = timings if timings is not None else {}
        seen: list[Job | None] = []

        def tick(stage: str, fraction: float) -> bool:
            current = self._heartbeat(job_id, stage, fraction)
            if current is None or current.cancel_requested:
                # Cancelled by the user, or taken from us (deleted, or reclaimed by the
                # reconciler after we looked dead): stop the engine either way.
                seen.append(current)
                return False
            return True

        def stage_ended(stage: str, seconds: float) -> None:
            self.metrics.job_stage.labels(stage.split(":", 1)[0]).observe(seconds)
            key = f"engine.{stage}"
            durations[key] = durations.get(key, 0.0) + seconds

        outcome = run_engine(
            job_id,
            workdir,
            limits_for(s),
            huge_pages=s.engine_huge_pages,
            engine_user=(s.engine_uid, s.engine_gid) if s.engine_uid is not None else None,
            every=min(s.progress_interval_seconds, s.job_heartbeat_seconds),
            tick=tick,
            on_artifact=on_artifact or (lambda name, path: None),
            on_stage=stage_ended,
        )
        if outcome.get("stopped"):
            return {"lost": True} if seen[-1] is None else {"cancelled": True}
        log.info("job %s: engine isolation %s", job_id, outcome.get("isolation"))
        return outcome

    def _heartbeat(self, job_id: str, stage: str, fraction: float) -> Job | None:
        return lifecycle.heartbeat(self.jobs, job_id, self.name, stage, fraction)

    def _finished(self, job: Job) -> None:
        if not job.state.terminal:
            return
        self.metrics.jobs_finished.labels(job.state.value).inc()
        if job.started_at and job.finished_at:
            self.metrics.job_duration.labels(job.state.value).observe(
                (job.finished_at - job.started_at).total_seconds()
            )
        if job.state is JobState.succeeded and job.result and job.result.get("size_ratio"):
            self.metrics.compression_ratio.observe(float(job.result["size_ratio"]))


def _source_suffix(fmt: str, filename: str | None) -> str:
    if fmt == "onnx_archive":
        name = (filename or "").lower()
        for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
            if name.endswith(suffix):
                return suffix
        return ".zip"
    return ".onnx"
