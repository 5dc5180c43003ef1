"""Prepare a model and apply recipe steps: what a recipe job and the auto search share.

``ingest`` loads and validates the upload (``service.engine.ingest``) and checks the job's
inputs against its signature; ``refuse_requantizing`` refuses to quantize an already quantized
model; ``apply_steps`` runs registered passes in order, each inside the same guard: a library
exception becomes ``pass_failed`` naming the pass and step, and every output is checked (an ONNX
model, valid, its graph under 2 GiB). A model whose weights stay in external data
(``IngestedModel.external_bytes``) only goes through passes that stream (``Pass.streams``), and
``save`` writes it with its external data files. The recipe path (``service.engine.recipe``) and every candidate and
mixed-precision probe of the search (``service.engine.search``) go through these, so a pass
never runs a second way. Heavy libraries (onnxruntime) are imported where used.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from service.engine.errors import EngineError
from service.engine.external import checkable
from service.engine.ingest import IngestedModel, load_model
from service.engine.inputs import check_inputs, input_signature, parse_inputs
from service.engine.limits import EngineLimits
from service.engine.registry import Pass, PassContext

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1  # the most one serialised ONNX file can hold


def scrub(text: str, *roots: Path) -> str:
    """A library message without server paths (workdir and any absolute path)."""
    for root in roots:
        for form in {str(root), str(Path(root).resolve())}:
            text = text.replace(form, "<workdir>")
    text = re.sub(r"(?<![\w<])/(?:[\w.\-]+/)+([\w.\-]+)", r"\1", text)
    text = " ".join(text.split())
    return text[:400]


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` to ``path``; returns the files that make the saved model (``path``, and
    its external data files when its weights stay in them: ``service.engine.external.save``;
    those outside ``path``'s folder are copied into ``<name>.data`` beside it).
    ``model_too_large`` when the graph alone is above what one ONNX file holds."""
    from service.engine import external

    if external.has_external(model):
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise EngineError("model_too_large", "the model's graph is larger than 2 GiB "
                              "without its weights, the most an ONNX file can hold")
        return external.save(model, path)
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise EngineError("model_too_large", "the model is larger than 2 GiB, the most a single "
                          "ONNX file can hold")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return [path]


def ingest(
    model_path: Path, directory: Path, limits: EngineLimits, inputs: dict[str, Any] | None,
) -> tuple[IngestedModel, dict[str, Any]]:
    """The upload loaded and validated under ``directory``, and the job's inputs parsed and
    checked against the model's signature (``invalid_inputs`` naming the input)."""
    ingested = load_model(Path(model_path), directory, limits=limits)
    given = parse_inputs(inputs)
    check_inputs(given, input_signature(ingested.model))
    return ingested, given


def refuse_requantizing(description: dict[str, Any], advice: str) -> None:
    """``already_quantized`` for a model that already holds quantized weights."""
    raise EngineError(
        "already_quantized",
        "the model is already quantized (" + ", ".join(description["quantization"])
        + f"); {advice}",
        {"quantization": description["quantization"]},
    )


def load_session(path: Path, limits: EngineLimits, workdir: Path) -> Any:
    """An ONNX Runtime session of ``path`` (run segment by segment when its weights pass
    what the job may hold at once: ``evaluate.original_session``); ``unsupported_model`` if
    it cannot load."""
    from service.engine.evaluate import original_session

    try:
        session = original_session(path, limits.latency_threads, limits)
        if hasattr(session, "segments"):  # each segment loads when it runs: load them now
            for k in range(len(session.segments)):
                session.session(k)
        return session
    except Exception as exc:
        raise EngineError("unsupported_model", "ONNX Runtime cannot load the model: "
                          + scrub(str(exc), workdir)) from None


@dataclass
class AppliedStep:
    """One pass as it ran: its config, what it noted (``PassContext.notes``), its seconds."""

    name: str
    config: Any
    notes: dict[str, Any]
    seconds: float


def apply_steps(
    model: onnx.ModelProto,
    steps: Sequence[tuple[type[Pass[Any]], Any]],
    workdir: Path,
    context: Callable[[int, type[Pass[Any]], Path], PassContext],
    check_cancelled: Callable[[], None] = lambda: None,
    scrub_root: Path | None = None,
) -> tuple[onnx.ModelProto, list[AppliedStep]]:
    """Run ``steps`` (from ``parse_recipe``) on ``model``, step ``i`` in ``workdir/<ii>_<pass>``
    with the context ``context(i, pass class, step dir)`` builds; returns the last model and
    what each step did. ``pass_failed`` / ``model_too_large`` name the pass and step; their
    messages show no path under ``scrub_root`` (default ``workdir``)."""
    from service.engine.external import has_external

    root = scrub_root or workdir
    applied: list[AppliedStep] = []
    for index, (cls, config) in enumerate(steps):
        check_cancelled()
        if not cls.streams and has_external(model):
            raise EngineError(
                "model_too_large",
                f"pass {cls.name!r} needs the whole model in memory, and this model's weights "
                "are kept in external data (past the inline limit); passes that read them one "
                f"tensor at a time: {', '.join(streaming_passes())}",
                {"pass": cls.name, "step": index},
            )
        step_dir = workdir / f"{index:02d}_{cls.name}"
        step_dir.mkdir(parents=True, exist_ok=True)
        ctx = context(index, cls, step_dir)
        started = time.perf_counter()
        try:
            result = cls().run(model, config, ctx)
        except EngineError:
            raise
        except Exception as exc:
            log.exception("pass %s failed", cls.name)
            raise EngineError(
                "pass_failed",
                f"pass {cls.name!r} failed: {type(exc).__name__}: {scrub(str(exc), root)}",
                {"pass": cls.name, "step": index},
            ) from None
        seconds = time.perf_counter() - started
        if not isinstance(result, onnx.ModelProto):
            raise EngineError("pass_failed", f"pass {cls.name!r} returned no model",
                              {"pass": cls.name, "step": index})
        _check_pass_output(result, cls.name, index, root)
        model = result
        applied.append(AppliedStep(cls.name, config, dict(ctx.notes), seconds))
    return model, applied


def streaming_passes() -> list[str]:
    """Names of the registered passes that run on a model kept in external data."""
    from service.engine.registry import registered_passes

    return sorted(name for name, cls in registered_passes().items() if cls.streams)


def _check_pass_output(model: onnx.ModelProto, name: str, index: int, workdir: Path) -> None:
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise EngineError("model_too_large", f"pass {name!r} produced a model above 2 GiB",
                          {"pass": name, "step": index})
    try:
        onnx.checker.check_model(checkable(model))
    except onnx.checker.ValidationError as exc:
        raise EngineError(
            "pass_failed",
            f"pass {name!r} produced an invalid model: "
            + scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", workdir),
            {"pass": name, "step": index},
        ) from None
