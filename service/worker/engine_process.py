"""The engine's child process: one per job, forked from a server with the libraries loaded.

Each job's compression runs here, not in the Celery worker, under resource limits (address
space, CPU time, file size, no core dumps): a model that exhausts memory or crashes ONNX
Runtime ends this process only, and the worker fails that job with a precise code. The
process is forked from a multiprocessing forkserver that has already imported numpy, onnx,
ONNX Runtime and the engine (``run_forked``), so a job does not pay ~2 s of imports; it dies
with that server (PR_SET_PDEATHSIG) if the worker itself is killed. ``python -m
service.worker.engine_process SPEC.json`` runs the same code in a fresh interpreter.

Protocol: progress as JSON lines (``{"stage": ..., "fraction": ...}``), an artifact whose file
is final as ``{"artifact": name, "path": ...}`` (the worker may store it early); the outcome as
``result.json`` in the spec's workdir: ``{"ok": true, "summary", "artifacts", "report"}`` or
``{"ok": false, "error": {code, message, details}}``. It reads other models (students,
teachers) from the object store by id through ``resolve_model``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    "boto3",
    "service.engine.pipeline",
    "service.engine.evaluate",
    "service.engine.registry",
    "service.worker.engine_process",
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
# address-space limit either way (freed blocks are reused, not added to).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOPT = {_M_MMAP_THRESHOLD: 32 * 1024 * 1024, _M_TRIM_THRESHOLD: 1024 * 1024 * 1024}


def _tune_malloc(ctypes: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the defaults
        libc = ctypes.CDLL("libc.so.6")
        for param, value in _MALLOPT.items():
            libc.mallopt(param, value)


def run_forked(spec_path: str, conn: Any, limits: dict[str, tuple[int, int]]) -> None:
    """Entry point in the forked child: isolate, limit, run ``main``, report through ``conn``."""
    import ctypes
    import os
    import resource

    os.setsid()  # its own process group: the worker signals the whole engine (and its helpers)
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the forkserver
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    workdir = Path(json.loads(Path(spec_path).read_text())["workdir"])
    (workdir / "engine.pid").write_text(str(os.getpid()))
    for name, (soft, hard) in limits.items():  # ``Limits.job_rlimits``
        resource.setrlimit(getattr(resource, name), (soft, hard))
    log_fd = os.open(workdir / "engine.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)  # library chatter on stdout/stderr goes to the job's log file
    os.dup2(log_fd, 2)
    os.chdir(workdir)
    _tune_malloc(ctypes)

    code = main(spec_path, lambda message: conn.send_bytes(json.dumps(message).encode()))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers inherited from the forkserver


def main(spec_path: str, send: Callable[[dict[str, Any]], None] = _print_message) -> int:
    """Run the job in ``spec_path``; progress and final artifacts go out through ``send``."""

    def emit(stage: str, fraction: float) -> None:
        send({"stage": stage, "fraction": round(float(fraction), 4)})

    def announce(name: str, path: Path) -> None:
        send({"artifact": name, "path": str(path)})

    signal.signal(signal.SIGTERM, _on_sigterm)
    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec["workdir"])
    result_path = workdir / "result.json"

    def write(result: dict[str, Any]) -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(result_path)

    try:
        from service.config import Settings
        from service.engine.errors import EngineError
        from service.engine.limits import EngineLimits
        from service.engine.pipeline import run_pipeline
        from service.storage.s3 import make_store
        from service.uploads.store import model_source_key

        stores: list[Any] = []  # the S3 client is made only if a recipe names another model

        def resolve_model(model_id: str) -> Path:
            if not (model_id.startswith("mdl_") and len(model_id) == 36 and model_id[4:].isalnum()):
                raise EngineError("model_not_found", f"model {model_id!r} not found")
            target = workdir / "refs" / f"{model_id}.onnx"
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                if not stores:
                    # Other models (students, teachers) come from the job's tenant space only.
                    settings = Settings()
                    stores.append(
                        make_store(settings.model_copy(update={"s3_prefix": spec["store_prefix"]}))
                    )
                try:
                    stores[0].download_file(model_source_key(model_id), target)
                except FileNotFoundError:
                    raise EngineError("model_not_found", f"model {model_id!r} not found") from None
            return target

        limits = EngineLimits(**spec.get("limits", {}))
        result = run_pipeline(
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
