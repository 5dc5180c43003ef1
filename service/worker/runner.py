"""``JobRunner``: runs one job, start to finish, from its id.

Idempotent: it re-reads the record, returns early when the job is finished or being run by a
live worker, and claims it with a compare-and-swap. The engine runs in a child process
(``engine_process``) under memory, CPU-time and file-size limits; this side streams progress
into the record, heart-beats, honours cancellation, enforces the soft and hard time limits,
stores the artifacts and writes the terminal state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import Settings, limits_for
from service.engine.devices import parse_device
from service.errors import NotFound, Unavailable
from service.jobs import lifecycle
from service.jobs.events import JobEvents
from service.jobs.record import Job, JobState
from service.jobs.store import JobStore, artifact_key
from service.metrics import ServiceMetrics
from service.storage.s3 import S3ObjectStore
from service.uploads.store import UploadStore, dataset_data_key, model_source_key
from service.worker.source_cache import SourceCache

log = logging.getLogger(__name__)

ARTIFACT_TYPES = {
    "model.onnx": "application/octet-stream",
    "model.onnx.zst": "application/zstd",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}

_SIGNAL_CODES = {
    signal.SIGSEGV: ("engine_crashed", "the engine crashed (segmentation fault) on this model"),
    signal.SIGBUS: ("engine_crashed", "the engine crashed (bus error) on this model"),
    signal.SIGABRT: ("engine_crashed", "the engine aborted on this model"),
    signal.SIGFPE: ("engine_crashed", "the engine crashed (arithmetic fault) on this model"),
    signal.SIGILL: ("engine_crashed", "the engine crashed (illegal instruction) on this model"),
    signal.SIGXCPU: ("timeout", "the job used up its CPU-time limit"),
    signal.SIGXFSZ: ("output_too_large", "the job tried to write a file past its size limit"),
}


@dataclass
class _Progress:
    stage: str = "starting"
    fraction: float = 0.0
    stage_started: float = field(default_factory=time.monotonic)
    durations: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        early = _EarlyUploads(self, job.id, workdir)
        try:
            model = self.uploads.get_model(job.model_id)
            suffix = _source_suffix(model.format, model.filename)
            model_path = workdir / "input" / f"model{suffix}"
            model_path.parent.mkdir()
            timings: dict[str, float] = {}
            clock = time.monotonic()
            hits = [self.sources.fetch(model.sha256, model.bytes, model_path,
                                lambda p: self.store.download_file(model_source_key(model.id), p))]
            dataset_path = None
            if job.dataset_id:
                dataset = self.uploads.get_dataset(job.dataset_id)
                dataset_path = workdir / "input" / "data.npz"
                hits.append(self.sources.fetch(
                    dataset.sha256, dataset.bytes, dataset_path,
                    lambda p: self.store.download_file(dataset_data_key(dataset.id), p)))
            device = parse_device(job.device).model_dump(mode="json")
            spec = {
                "workdir": str(workdir),
                "model_path": str(model_path),
                "dataset_path": str(dataset_path) if dataset_path else None,
                "recipe": job.recipe,
                "device": device,
                "constraints": job.constraints,
                "inputs": job.inputs,
                "store_prefix": self.store.prefix,
                # Without it the engine would run under EngineLimits' defaults.
                "limits": limits_for(self.settings).engine.model_dump(mode="json"),
            }
            (workdir / "spec.json").write_text(json.dumps(spec))
            timings["download"] = time.monotonic() - clock
            clock = time.monotonic()
            outcome = self._run_engine(job.id, workdir, timings, early.start)
            timings["engine"] = time.monotonic() - clock
            if outcome.get("lost"):
                early.cancel()  # the job is another worker's now: its artifacts, not ours
                return self.jobs.get(job.id)
            if outcome.get("cancelled"):
                early.discard()
                return lifecycle.mark_cancelled(self.jobs, job.id)
            if not outcome.get("ok"):
                early.discard()
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
                names = self._store_artifacts(job.id, outcome["artifacts"], workdir, early)
            except ValueError as exc:  # the engine named a file it may not hand out
                early.discard()
                log.error("job %s: %s", job.id, exc)
                return lifecycle.fail(self.jobs, job.id, "internal_error", "the engine's output was refused")
            timings["upload"] = time.monotonic() - clock
            if early.seconds:
                timings["upload_during_engine"] = early.seconds
            summary = outcome.get("summary") or {}
            # Where the worker's time went (engine stages as the engine reported them).
            summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            summary["inputs_from_worker_cache"] = sum(hits)  # not downloaded: seen before

            return lifecycle.succeed(self.jobs, job.id, self.name, result=summary, artifacts=names)
        finally:
            early.close()  # no upload may still be reading the workdir
            shutil.rmtree(workdir, ignore_errors=True)

    def _upload_artifact(self, job_id: str, name: str, path: Path) -> str:
        self.store.upload_file(
            artifact_key(job_id, name),
            path,
            content_type=ARTIFACT_TYPES[name],
            metadata={"job": job_id},
        )
        return name

    def _store_artifacts(
        self, job_id: str, artifacts: dict[str, str], workdir: Path, early: _EarlyUploads
    ) -> list[str]:
        """Upload the artifacts side by side (the stage is recorded meanwhile), except those
        already stored while the engine ran; their names. ValueError: a path the engine may
        not hand out."""
        paths = {name: _artifact_path(workdir, name, raw) for name, raw in artifacts.items()}
        # Early uploads end first, so that a re-upload below is the last write of its key.
        stored = set(early.wait_all())
        for name in stored - set(paths):  # announced, then not part of the outcome
            self.store.delete(artifact_key(job_id, name))
        todo = [name for name in paths if not early.covers(name, paths[name])]
        with ThreadPoolExecutor(max_workers=min(4, len(todo) + 1)) as pool:
            stage = pool.submit(self._heartbeat, job_id, "upload", 0.98)
            done = list(pool.map(lambda n: self._upload_artifact(job_id, n, paths[n]), todo))
            stage.result()  # its outcome is moot: the final write checks ownership again
        return sorted(set(done) | (stored & set(paths)))

    def _run_engine(
        self,
        job_id: str,
        workdir: Path,
        timings: dict[str, float] | None = None,
        on_artifact: Callable[[str, str], None] | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        limits = limits_for(s)
        progress = _Progress(durations=timings if timings is not None else {})
        stderr_path = workdir / "engine.stderr"
        proc = _EngineProcess(workdir / "spec.json", limits.job_rlimits, s.engine_huge_pages)
        reader = threading.Thread(
            target=_read_progress,
            args=(proc, progress, self.metrics, on_artifact or (lambda name, path: None)),
            daemon=True,
        )
        reader.start()
        started = time.monotonic()
        last_write = 0.0
        soft_sent = False
        lost: bool | None = None
        while proc.poll() is None:
            proc.wait_for(0.25)  # returns as soon as the engine ends
            elapsed = time.monotonic() - started
            if elapsed > limits.job_hard_seconds:
                _kill(proc, signal.SIGKILL)
                break
            if elapsed > limits.job_soft_seconds and not soft_sent:
                _kill(proc, signal.SIGTERM)
                soft_sent = True
            now = time.monotonic()
            if now - last_write >= min(s.progress_interval_seconds, s.job_heartbeat_seconds):
                last_write = now
                with progress.lock:
                    stage, fraction = progress.stage, progress.fraction
                current = self._heartbeat(job_id, stage, fraction)
                if current is None or current.cancel_requested:
                    # Cancelled by the user, or taken from us (deleted, or reclaimed by the
                    # reconciler after we looked dead): stop the engine either way.
                    lost = current is None
                    _kill(proc, signal.SIGKILL)
                    break
        proc.wait()
        reader.join(timeout=5)
        elapsed = time.monotonic() - started
        if lost is not None:
            return {"lost": True} if lost else {"cancelled": True}
        result_file = workdir / "result.json"
        if result_file.exists():
            with contextlib.suppress(ValueError):
                outcome = dict(json.loads(result_file.read_text()))
                error = outcome.get("error") or {}
                if error.get("code") == "internal_error":
                    # The job's message names only the exception type (no paths, no internals);
                    # the operator gets the engine's traceback, with the job id, in this log.
                    trace = (stderr_path.read_bytes()[-20000:].decode(errors="replace")
                             if stderr_path.exists() else "(no engine stderr)")
                    log.error("engine for job %s failed unexpectedly: %s\n%s", job_id,
                              error.get("message"), trace)
                return outcome
        code = proc.returncode
        tail = (
            stderr_path.read_bytes()[-2000:].decode(errors="replace") if stderr_path.exists() else ""
        )
        log.warning("engine for job %s ended with %s: %s", job_id, code, tail)
        if elapsed > limits.job_soft_seconds:
            return {
                "ok": False,
                "error": {
                    "code": "timeout",
                    "message": f"the job ran past its time limit of {limits.job_soft_seconds} s",
                },
            }
        if code is not None and code < 0 and -code in _SIGNAL_CODES:
            c, m = _SIGNAL_CODES[signal.Signals(-code)]
            return {"ok": False, "error": {"code": c, "message": m}}
        if code == -signal.SIGKILL or "MemoryError" in tail or "bad_alloc" in tail:
            return {
                "ok": False,
                "error": {
                    "code": "out_of_memory",
                    "message": f"the job was stopped: it exceeded its memory limit of {s.job_memory_limit_mb} MB",
                },
            }
        return {
            "ok": False,
            "error": {
                "code": "engine_crashed",
                "message": f"the engine process ended unexpectedly (exit {code})",
            },
        }

    # -- record updates ------------------------------------------------------------------------
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


def _artifact_path(workdir: Path, name: str, raw: str) -> Path:
    """The file the engine names as artifact ``name``, checked: a known artifact name, a
    regular file (not a link) inside the job's workdir. The engine reads untrusted models;
    were it subverted, it must not be able to hand out any other file of the worker's."""
    if name not in ARTIFACT_TYPES:
        raise ValueError(f"unknown artifact {name!r}")
    path = Path(raw)
    if not path.is_absolute() or path.is_symlink() or not path.is_file():
        raise ValueError(f"artifact {name!r} is not a regular file: {raw!r}")
    if not path.resolve().is_relative_to(workdir.resolve()):
        raise ValueError(f"artifact {name!r} lies outside the job's workdir: {raw!r}")
    return path.resolve()


class _EarlyUploads:
    """Artifacts stored while the engine still runs (the model, while it is evaluated).

    Each is uploaded in the background as soon as the engine says its file is final; the
    runner then skips it if the engine's outcome names the same file, and deletes it if the
    job does not succeed. ``close`` waits for every upload (the workdir is removed after)."""

    def __init__(self, runner: JobRunner, job_id: str, workdir: Path) -> None:
        self._runner, self._job_id, self._workdir = runner, job_id, workdir
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[str, tuple[Path, Future[str]]] = {}
        self._lock = threading.Lock()
        self.seconds = 0.0  # spent uploading in the background, while the engine ran

    def start(self, name: str, raw: str) -> None:
        try:
            path = _artifact_path(self._workdir, name, raw)
        except ValueError as exc:
            log.warning("job %s: early artifact ignored: %s", self._job_id, exc)
            return
        with self._lock:
            if name in self._started:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="artifact")
            future = self._pool.submit(self._upload, name, path)
            self._started[name] = (path, future)

    def _upload(self, name: str, path: Path) -> str:
        started = time.monotonic()
        self._runner._upload_artifact(self._job_id, name, path)
        with self._lock:
            self.seconds += time.monotonic() - started
        return name

    def covers(self, name: str, path: Path) -> bool:
        with self._lock:
            return name in self._started and self._started[name][0] == path

    def wait_all(self) -> list[str]:
        """Names of the early uploads, once all are stored (re-raises an upload's error)."""
        with self._lock:
            started = list(self._started.values())
        return [future.result() for _, future in started]

    def cancel(self) -> None:
        with self._lock:
            for _, future in self._started.values():
                future.cancel()

    def discard(self) -> None:
        """The job did not succeed: remove what was stored early."""
        with self._lock:
            started = dict(self._started)
        for name, (_, future) in started.items():
            with contextlib.suppress(Exception):
                future.result()
            with contextlib.suppress(Exception):
                self._runner.store.delete(artifact_key(self._job_id, name))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _source_suffix(fmt: str, filename: str | None) -> str:
    if fmt == "onnx_archive":
        name = (filename or "").lower()
        for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
            if name.endswith(suffix):
                return suffix
        return ".zip"
    return ".onnx"


_CONTEXT: list[Any] = []  # this process's engine forkserver context, made on first use


def _engine_context() -> Any:
    import multiprocessing

    if not _CONTEXT:
        from service.worker.engine_process import PRELOAD

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


# glibc malloc tunable: back the engine's heap with transparent huge pages where the kernel
# offers them on request (THP "madvise" mode; glibc >= 2.35, ignored by older ones). A forked
# engine starts with an empty heap and first-touches every page of every model copy it makes:
# 2 MiB pages cut those faults ~500x (17 MB model: 0.86 -> 0.73 s per job on this host).
_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def start_engine_server(huge_pages: bool = True) -> None:
    """Start this process's engine forkserver (it imports the engine, ~1 s) if it does not
    run: when a worker's pool process starts, and before each job (a dead one is restarted).
    Tunables are read when a process starts, so the server gets its environment here."""
    from multiprocessing import forkserver

    _engine_context()
    saved = os.environ.get("GLIBC_TUNABLES")
    if huge_pages and _HUGE_PAGES_TUNABLE not in (saved or ""):
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [saved, _HUGE_PAGES_TUNABLE]))
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = saved


class _EngineProcess:
    """A job's engine process, forked from the forkserver (libraries already imported)."""

    def __init__(
        self, spec_path: Path, limits: dict[str, tuple[int, int]], huge_pages: bool = True
    ) -> None:
        import multiprocessing

        from service.worker.engine_process import run_forked

        start_engine_server(huge_pages)
        ctx = _engine_context()
        self._conn, child_end = ctx.Pipe(duplex=False)
        # Celery's pool processes are billiard processes: daemonic (multiprocessing refuses
        # their children so that none outlive them) and with an authkey multiprocessing cannot
        # pickle. Ours cannot outlive the task: the runner always joins or kills the engine
        # before returning, and the engine dies with its forkserver (PR_SET_PDEATHSIG). So for
        # this start only, the flag is lifted and a plain authkey stands in.
        config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
        saved = {key: config[key] for key in ("daemon", "authkey") if key in config}
        config.pop("daemon", None)
        config["authkey"] = multiprocessing.process.AuthenticationString(os.urandom(32))  # type: ignore[attr-defined]
        try:
            self._proc = ctx.Process(
                target=run_forked, args=(str(spec_path), child_end, limits), name="edgepress-engine"
            )
            self._proc.start()
        finally:
            config.pop("daemon", None)
            config.update(saved)
        child_end.close()
        self.pid: int = self._proc.pid

    @property
    def returncode(self) -> int | None:
        code: int | None = self._proc.exitcode
        return code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int | None:
        self._proc.join()
        return self.returncode

    def wait_for(self, seconds: float) -> None:
        """Block until the process ends or ``seconds`` pass."""
        multiprocessing.connection.wait([self._proc.sentinel], timeout=seconds)

    def messages(self) -> Iterator[bytes]:
        while True:
            try:
                yield self._conn.recv_bytes()
            except (EOFError, OSError):
                return


def _kill(proc: _EngineProcess, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # not yet its own group leader (just forked)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _read_progress(
    proc: _EngineProcess,
    progress: _Progress,
    metrics: ServiceMetrics,
    on_artifact: Callable[[str, str], None],
) -> None:
    def close_stage(now: float) -> None:
        spent = now - progress.stage_started
        metrics.job_stage.labels(progress.stage.split(":", 1)[0]).observe(spent)
        key = f"engine.{progress.stage}"
        progress.durations[key] = progress.durations.get(key, 0.0) + spent

    for raw in proc.messages():
        try:
            msg = json.loads(raw)
            if "artifact" in msg:
                on_artifact(str(msg["artifact"]), str(msg["path"]))
                continue
            stage, fraction = str(msg["stage"])[:64], float(msg["fraction"])
        except (ValueError, KeyError, TypeError):
            continue
        with progress.lock:
            if stage != progress.stage:
                now = time.monotonic()
                close_stage(now)
                progress.stage, progress.stage_started = stage, now
            progress.fraction = max(0.0, min(1.0, fraction))
    with progress.lock:
        close_stage(time.monotonic())
