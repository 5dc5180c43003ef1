"""The engine's child process: ``python -m service.worker.engine_process SPEC.json``.

Each job's compression runs here, not in the Celery worker, under resource limits set by the
parent (address space, CPU time, file size, no core dumps): a model that exhausts memory or
crashes ONNX Runtime ends this process only, and the worker fails that job with a precise code.

Protocol: progress as JSON lines on stdout (``{"stage": ..., "fraction": ...}``); the outcome as
``result.json`` in the spec's workdir: ``{"ok": true, "summary", "artifacts", "report"}`` or
``{"ok": false, "error": {code, message, details}}``. It reads other models (students,
teachers) from the object store by id through ``resolve_model``.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any


class _SoftTimeLimit(BaseException):
    """Raised by SIGTERM at the soft time limit; a BaseException so that no library's (or
    pass wrapper's) ``except Exception`` turns it into another error."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _SoftTimeLimit()


def _emit(stage: str, fraction: float) -> None:
    sys.stdout.write(json.dumps({"stage": stage, "fraction": round(float(fraction), 4)}) + "\n")
    sys.stdout.flush()


def main(spec_path: str) -> int:
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

        settings = Settings()
        # Other models (students, teachers) are looked up in the job's tenant space only.
        store = make_store(settings.model_copy(update={"s3_prefix": spec["store_prefix"]}))

        def resolve_model(model_id: str) -> Path:
            if not (model_id.startswith("mdl_") and len(model_id) == 36 and model_id[4:].isalnum()):
                raise EngineError("model_not_found", f"model {model_id!r} not found")
            target = workdir / "refs" / f"{model_id}.onnx"
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                try:
                    store.download_file(model_source_key(model_id), target)
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
            progress=_emit,
            resolve_model=resolve_model,
            limits=limits,
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
