"""The engine's process, both sides: the worker starts, limits, watches and stops it
(``run_engine``); in it, one job's compression runs (``run_forked``, ``main``).

Each job's compression runs in its own process, not in the Celery worker, under resource
limits (memory, CPU time, file size, no core dumps: ``Limits.job_rlimits``): a model
that exhausts memory or crashes ONNX Runtime ends this process only, and the worker fails that
job with a precise code. The process is forked from a multiprocessing forkserver that has
already imported numpy, onnx, ONNX Runtime and the engine (``PRELOAD``), so a job does not
pay ~2 s of imports; it dies with that server (PR_SET_PDEATHSIG) if the worker itself is
killed. ``python -m service.worker.engine_host SPEC.json`` runs the same code in a fresh
interpreter.

Supervision (``run_engine``): SIGTERM at the soft time limit (the engine writes a timeout
outcome), SIGKILL at the hard one or when the caller's ``tick`` says stop (cancelled, or the
job is no longer this worker's); an exit without an outcome is named from its signal or its
stderr (crash, out of memory, CPU time, file size).

Protocol, over a pipe: progress as ``{"stage": ..., "fraction": ...}``, an artifact whose file
is final as ``{"artifact": name, "path": ...}`` (the worker may store it early); the outcome as
``result.json`` in the spec's workdir: ``{"ok": true, "summary", "artifacts", "report"}`` or
``{"ok": false, "error": {code, message, details}}``, with ``isolation``: what
``service.worker.isolation`` could apply (environment, network, user, files). Other models the recipe
reads (students, teachers) were fetched by the worker into ``workdir/refs`` before the engine
started: ``resolve_model`` only looks there, the engine has no object store client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import Limits

log = logging.getLogger(__name__)

# -- in the worker ----------------------------------------------------------------------------
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
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_engine(
    job_id: str,
    workdir: Path,
    limits: Limits,
    *,
    huge_pages: bool,
    engine_user: tuple[int, int] | None = None,
    every: float,
    tick: Callable[[str, float], bool],
    on_artifact: Callable[[str, str], None],
    on_stage: Callable[[str, float], None],
) -> dict[str, Any]:
    """Run the job in ``workdir/spec.json`` in an engine process and return its outcome
    (``result.json``, or an error named from how the process ended). ``tick(stage,
    fraction)`` is called every ``every`` seconds; False stops the engine at once and the
    outcome is ``{"stopped": True}``. ``on_artifact(name, path)``: a final file announced;
    ``on_stage(stage, seconds)``: a stage ended (both from a reader thread). ``engine_user``:
    (uid, gid) the engine runs as where the worker is root (``isolation``)."""
    progress = _Progress()
    stderr_path = workdir / "engine.stderr"
    proc = EngineProcess(workdir / "spec.json", limits.job_rlimits, huge_pages, engine_user)
    reader = threading.Thread(
        target=_read_progress, args=(proc, progress, on_artifact, on_stage), daemon=True
    )
    reader.start()
    started = time.monotonic()
    last_tick = last_count = 0.0
    soft_sent = False
    stopped = over_output = False
    while proc.poll() is None:
        proc.wait_for(0.25)  # returns as soon as the engine ends
        elapsed = time.monotonic() - started
        if elapsed > limits.job_hard_seconds:
            proc.kill(signal.SIGKILL)
            break
        if elapsed > limits.job_soft_seconds and not soft_sent:
            proc.kill(signal.SIGTERM)
            soft_sent = True
        now = time.monotonic()
        if now - last_count >= 1.0:
            last_count = now
            if written_bytes(workdir) > limits.job_output_bytes:
                over_output = True
                proc.kill(signal.SIGKILL)
                break
        if now - last_tick >= every:
            last_tick = now
            with progress.lock:
                stage, fraction = progress.stage, progress.fraction
            if not tick(stage, fraction):
                stopped = True
                proc.kill(signal.SIGKILL)
                break
    proc.wait()
    reader.join(timeout=5)
    elapsed = time.monotonic() - started
    if stopped:
        return {"stopped": True}
    # Also what it wrote between the last count and its end.
    over_output = over_output or written_bytes(workdir) > limits.job_output_bytes
    if over_output:
        return {
            "ok": False,
            "error": {
                "code": "output_too_large",
                "message": "the job wrote more than its output limit of "
                f"{limits.job_output_bytes // (1024 * 1024)} MB (all files together)",
            },
        }
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
        memory_mb = limits.job_rlimits["RLIMIT_DATA"][0] // (1024 * 1024)
        return {
            "ok": False,
            "error": {
                "code": "out_of_memory",
                "message": f"the job was stopped: it exceeded its memory limit of {memory_mb} MB",
            },
        }
    return {
        "ok": False,
        "error": {
            "code": "engine_crashed",
            "message": f"the engine process ended unexpectedly (exit {code})",
        },
    }


def written_bytes(workdir: Path) -> int:
    """Bytes of every file under ``workdir`` but the job's inputs (``input``, ``refs``): what
    the engine wrote, all its processes and files together (apparent sizes)."""
    total = 0
    for root, dirs, files in os.walk(workdir):
        if root == str(workdir):
            dirs[:] = [d for d in dirs if d not in ("input", "refs")]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


_CONTEXT: list[Any] = []  # this process's engine forkserver context, made on first use


def _engine_context() -> Any:
    if not _CONTEXT:
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
    The server is started with the engine's environment only (``engine_environment``: no
    credentials, so none in any engine's memory or ``/proc/<pid>/environ``), plus the malloc
    tunable: both are read when a process starts, so it gets them here. ``ensure_running``
    execs the server with this process's environment, which is swapped for that one call
    (in the pool process, before a job, while no other thread of ours reads it)."""
    from multiprocessing import forkserver

    from service.worker.isolation import engine_environment

    _engine_context()
    saved = dict(os.environ)
    env = engine_environment(saved)
    if huge_pages and _HUGE_PAGES_TUNABLE not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"),
                                                       _HUGE_PAGES_TUNABLE]))
    os.environ.clear()
    os.environ.update(env)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


class EngineProcess:
    """A job's engine process, forked from the forkserver (libraries already imported)."""

    def __init__(
        self,
        spec_path: Path,
        limits: dict[str, tuple[int, int]],
        huge_pages: bool = True,
        engine_user: tuple[int, int] | None = None,
    ) -> None:
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
                target=run_forked, args=(str(spec_path), child_end, limits, engine_user),
                name="edgepress-engine",
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

    def kill(self, sig: int) -> None:
        """Signal the engine's whole process group (it and any helper it started)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:  # not yet its own group leader (just forked)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def messages(self) -> Iterator[bytes]:
        while True:
            try:
                yield self._conn.recv_bytes()
            except (EOFError, OSError):
                return


def _read_progress(
    proc: EngineProcess,
    progress: _Progress,
    on_artifact: Callable[[str, str], None],
    on_stage: Callable[[str, float], None],
) -> None:
    def close_stage(now: float) -> None:
        on_stage(progress.stage, now - progress.stage_started)

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


# -- in the engine process ---------------------------------------------------------------------
class _SoftTimeLimit(BaseException):
    """Raised by SIGTERM at the soft time limit; a BaseException so that no library's (or
    pass wrapper's) ``except Exception`` turns it into another error."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _SoftTimeLimit()


def _print_message(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# Imported by the forkserver before it forks any job.
PRELOAD = [
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "service.engine.compress",
    "service.engine.evaluate",
    "service.engine.registry",
    "service.worker.engine_host",
    "zstandard",
    "service.engine.report_html",
    "service.worker.engine_preload",  # last: imports the passes, then freezes the heap
]

# glibc malloc options for an engine process (``mallopt`` parameter numbers from malloc.h).
# By default blocks over 128 KiB are fresh ``mmap``s, unmapped again when freed, and the top of
# the heap is trimmed back to the kernel: a job that parses, copies and serialises a model
# several times would fault in (and have zeroed) new pages for every copy. A long-lived process
# escapes this because glibc raises both thresholds as it frees large blocks; a forked child
# starts with the defaults, and on a 17 MB model measured 160k page faults and ~0.45 s of
# system time against 53k and ~0.2 s with these. The memory stays within the job's
# memory limit either way (freed blocks are reused, not added to).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOPT = {_M_MMAP_THRESHOLD: 32 * 1024 * 1024, _M_TRIM_THRESHOLD: 1024 * 1024 * 1024}


def _tune_malloc(ctypes: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the defaults
        libc = ctypes.CDLL("libc.so.6")
        for param, value in _MALLOPT.items():
            libc.mallopt(param, value)


def run_forked(
    spec_path: str,
    conn: Any,
    limits: dict[str, tuple[int, int]],
    engine_user: tuple[int, int] | None = None,
) -> None:
    """Entry point in the forked child: isolate, limit, run ``main``, report through ``conn``."""
    import ctypes
    import os
    import resource

    from service.worker import isolation

    os.setsid()  # its own process group: the worker signals the whole engine (and its helpers)
    workdir = Path(json.loads(Path(spec_path).read_text())["workdir"])
    needed = [sys.executable, *(p for p in sys.path if p)]
    applied = isolation.apply(str(workdir), engine_user, needed)
    # After the user change (which clears it): die with the forkserver.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Temporary files (libraries', candidates') are the job's, counted and removed with it.
    (workdir / "tmp").mkdir(exist_ok=True)
    os.environ.update(TMPDIR=str(workdir / "tmp"), HOME=str(workdir))
    import tempfile

    tempfile.tempdir = None
    (workdir / "engine.pid").write_text(str(os.getpid()))
    for name, (soft, hard) in limits.items():  # ``Limits.job_rlimits``
        resource.setrlimit(getattr(resource, name), (soft, hard))
    log_fd = os.open(workdir / "engine.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)  # library chatter on stdout/stderr goes to the job's log file
    os.dup2(log_fd, 2)
    os.chdir(workdir)
    _tune_malloc(ctypes)

    code = main(spec_path, lambda message: conn.send_bytes(json.dumps(message).encode()),
                isolation=applied)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers inherited from the forkserver


class PeakMemory:
    """The engine process's peak memory, measured from inside it: the kernel's high-water mark
    of its resident set (``VmHWM`` in /proc/self/status: anonymous and file-backed pages
    together), and, sampled every ``interval`` seconds by a thread (the kernel keeps no peak
    per kind), the largest ``RssAnon`` (heap, arrays, ONNX Runtime's own buffers) and
    ``RssFile`` (pages of mapped files: weights read through ``np.memmap`` and external
    initializers ONNX Runtime maps; the kernel can drop these under pressure, they are not
    the job's heap) seen, and the largest ``VmData`` (private writable memory, mapped or
    not: what the job's memory limit, ``RLIMIT_DATA``, counts). ``children_max_rss_mb``: the
    largest peak of the fresh-process memory probes of ``service.engine.lm``, as each measured its own ``VmHWM``;
    ``children_rusage_max_rss_mb``: ``RUSAGE_CHILDREN``'s largest, over every process the
    engine started and waited for (auto's parallel candidates too), which Linux starts from
    the engine's resident set at the fork: an upper bound, not a child's own peak."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak: dict[str, int] = {"RssAnon": 0, "RssFile": 0, "VmData": 0}
        self.start: dict[str, int] = {}
        self.current = "start"
        # the largest VmRSS / RssAnon / RssFile / VmData sampled while each stage ran
        self.by_stage: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self.start = self.status()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    @staticmethod
    def status() -> dict[str, int]:
        """The kB fields of /proc/self/status ({} where there is none)."""
        from service.engine.devices.host import process_memory_kb

        return process_memory_kb()

    def stage(self, name: str) -> None:
        """The job entered progress stage ``name`` (what ``by_stage`` files samples under)."""
        if name != self.current:
            self._record(self.status())  # the stage that ends gets its last sample
            self.current = name

    def _record(self, now: dict[str, int]) -> None:
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))
        seen = self.by_stage.setdefault(self.current,
                                        {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmData": 0})
        for key in seen:
            seen[key] = max(seen[key], now.get(key, 0))

    def _sample(self) -> None:
        while True:
            self._record(self.status())
            if self._stop.wait(self.interval):
                return

    def report(self) -> dict[str, Any]:
        """``peak_rss_mb`` and how it was measured."""
        import resource

        now = self.status()
        self._record(now)
        from service.engine.lm import PROBE_PEAKS_MB

        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
        mb = 1024.0
        return {
            "peak_rss_mb": round(now.get("VmHWM", 0) / mb, 1) if now else None,
            "peak_rss_anon_mb": round(self.peak["RssAnon"] / mb, 1) if now else None,
            "peak_rss_file_mb": round(self.peak["RssFile"] / mb, 1) if now else None,
            "peak_vm_data_mb": round(self.peak["VmData"] / mb, 1) if now else None,
            "children_max_rss_mb": round(max(PROBE_PEAKS_MB, default=0.0), 1),
            "children_rusage_max_rss_mb": round(children / mb, 1),
            # what the process held before the job (the preloaded libraries): the job's own
            # growth is the peak less this
            "start_rss_mb": round(self.start.get("VmRSS", 0) / mb, 1),
            "start_rss_anon_mb": round(self.start.get("RssAnon", 0) / mb, 1),
            "start_vm_data_mb": round(self.start.get("VmData", 0) / mb, 1),
            "by_stage_mb": {stage: {"rss": round(v["VmRSS"] / mb, 1),
                                    "anon": round(v["RssAnon"] / mb, 1),
                                    "file": round(v["RssFile"] / mb, 1),
                                    "data": round(v["VmData"] / mb, 1)}
                            for stage, v in self.by_stage.items()},
            "measured": "engine process: VmHWM (peak resident set, anonymous and file-backed "
                        f"pages together); RssAnon and RssFile peaks sampled every "
                        f"{self.interval} s (file-backed: mapped weight files, reclaimable); "
                        "VmData (private writable memory, what the job's memory limit "
                        "RLIMIT_DATA counts) sampled alike; "
                        "children: the largest VmHWM the fresh-process memory probes measured "
                        "of themselves (children_rusage: RUSAGE_CHILDREN, which starts from the "
                        "engine's resident set at each fork, an upper bound); by stage: the "
                        "largest sampled while each progress stage ran",
        }


def main(
    spec_path: str,
    send: Callable[[dict[str, Any]], None] = _print_message,
    isolation: dict[str, str] | None = None,
) -> int:
    """Run the job in ``spec_path``; progress and final artifacts go out through ``send``;
    ``isolation`` (what the process runs under) goes into the outcome."""

    memory = PeakMemory()

    def emit(stage: str, fraction: float) -> None:
        memory.stage(stage)
        send({"stage": stage, "fraction": round(float(fraction), 4)})

    def announce(name: str, path: Path) -> None:
        send({"artifact": name, "path": str(path)})

    signal.signal(signal.SIGTERM, _on_sigterm)
    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec["workdir"])
    result_path = workdir / "result.json"

    def write(result: dict[str, Any]) -> None:
        if isolation is not None:
            result["isolation"] = isolation
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(result_path)

    try:
        from service.engine.compress import compress
        from service.engine.errors import EngineError
        from service.engine.limits import EngineLimits

        def resolve_model(model_id: str) -> Path:
            # Fetched by the worker from the job's tenant space (``refs`` in the spec).
            path = (spec.get("refs") or {}).get(model_id)
            if not path or not Path(path).is_file():
                raise EngineError("model_not_found", f"model {model_id!r} not found")
            return Path(path)

        limits = EngineLimits(**spec.get("limits", {}))
        with memory:
            result = compress(
                Path(spec["model_path"]),
                spec["recipe"],
                workdir / "engine",
                dataset_path=Path(spec["dataset_path"]) if spec.get("dataset_path") else None,
                device=spec.get("device"),
                constraints=spec.get("constraints") or {},
                inputs=spec.get("inputs") or None,
                progress=emit,
                resolve_model=resolve_model,
                limits=limits,
                artifact_ready=announce,
            )
        peak = memory.report()
        result.summary["memory"] = peak
        result.summary["peak_rss_mb"] = peak["peak_rss_mb"]
        result.report["memory"] = peak
        report_path = workdir / "report.json"
        report_path.write_text(json.dumps(result.report, indent=2, default=str))
        artifacts = {name: str(path) for name, path in result.artifacts.items()}
        artifacts["report.json"] = str(report_path)
        from service.engine.report_html import render_report_html

        # The HTML view of the same report, drawn from the JSON as written (what users get).
        html_path = workdir / "report.html"
        html_path.write_text(
            render_report_html(json.loads(report_path.read_text())), encoding="utf-8"
        )
        artifacts["report.html"] = str(html_path)
        write({"ok": True, "summary": result.summary, "artifacts": artifacts})
        return 0
    except _SoftTimeLimit:
        write(
            {
                "ok": False,
                "error": {"code": "timeout", "message": "the job ran past its time limit"},
            }
        )
        return 3
    except MemoryError:
        write(
            {
                "ok": False,
                "error": {
                    "code": "out_of_memory",
                    "message": "the job ran out of memory (limit reached)",
                },
            }
        )
        return 4
    except Exception as exc:  # noqa: BLE001 - the parent needs a verdict for every failure
        from service.engine.errors import EngineError

        if isinstance(exc, EngineError):
            write({"ok": False, "error": exc.to_dict()})
            return 2
        traceback.print_exc(file=sys.stderr)
        write(
            {
                "ok": False,
                "error": {
                    "code": "internal_error",
                    "message": f"the engine failed unexpectedly ({type(exc).__name__})",
                },
            }
        )
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
