"""The engine's one public verb: ``compress(model, recipe | "auto", workdir, ...)``.

The Celery worker, the CLI's local mode, the benchmarks and the tests call it with files on
disk; it knows no Flask, S3 or Celery. A list of steps runs as a recipe job
(``service.engine.recipe``); ``"auto"`` searches candidates for the device under the
constraints (``service.engine.search``), each candidate itself a recipe job. Both prepare the
model and apply passes the same way (``service.engine.pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from service.engine.limits import EngineLimits
from service.engine.recipe import run_recipe
from service.engine.result import PipelineResult


def compress(
    model_path: Path,
    recipe: list[dict] | Literal["auto"],
    workdir: Path,
    *,
    dataset_path: Path | None = None,
    device: dict | str | None = None,
    constraints: dict | None = None,
    progress: Callable[[str, float], None] = lambda stage, fraction: None,
    check_cancelled: Callable[[], None] = lambda: None,
    resolve_model: Callable[[str], Path] | None = None,
    limits: EngineLimits | None = None,
    artifact_ready: Callable[[str, Path], None] | None = None,
    inputs: dict[str, Any] | None = None,
    eval_dataset_path: Path | None = None,
) -> PipelineResult:
    """Compress the ONNX model (or archive) at ``model_path`` under ``workdir``.

    ``recipe`` is a list of ``{"pass": name, **config}`` steps or ``"auto"`` (``constraints``
    apply to auto only). ``dataset_path`` is an uploaded ``.npz``/``.npy`` dataset (calibration,
    training, evaluation); ``device`` a device name or inline profile; ``inputs`` the job's
    input shapes and values; ``progress(stage, fraction)``, ``check_cancelled()`` (raises to
    stop) and ``artifact_ready(name, path)`` are the caller's hooks; ``resolve_model(id)`` finds
    a teacher model for distillation. See ``run_recipe`` and ``run_auto`` for what each path
    does and reports. Raises ``EngineError``.
    """
    if recipe == "auto":
        # The search is imported only for auto jobs: a recipe job never loads it.
        from service.engine.search import run_auto

        return run_auto(
            model_path, workdir, dataset_path=dataset_path, device=device,
            constraints=constraints, progress=progress, check_cancelled=check_cancelled,
            resolve_model=resolve_model, limits=limits, inputs=inputs,
        )
    return run_recipe(
        model_path, recipe, workdir, dataset_path=dataset_path, device=device,
        progress=progress, check_cancelled=check_cancelled, resolve_model=resolve_model,
        limits=limits, artifact_ready=artifact_ready, inputs=inputs,
        eval_dataset_path=eval_dataset_path,
    )
