"""Iterative pruning: prune to each target of a schedule, recover by distillation in between.

Shared by the pruning passes so that a schedule such as ``[0.3, 0.5, 0.7]`` behaves the same in
``prune_magnitude``, ``prune_channels`` and ``prune_2_4`` (a single round there). Imports torch
through the distillation module: call it inside a pass's ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from service.engine.registry import PassContext
from service.engine.training.settings import RecoverySettings

PruneFn = Callable[[onnx.ModelProto, float], tuple[onnx.ModelProto, dict[str, Any]]]


def run_rounds(
    model: onnx.ModelProto,
    targets: list[float],
    prune: PruneFn,
    ctx: PassContext,
    *,
    recover: bool,
    recovery: RecoverySettings,
    what: str,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Apply ``prune(model, target)`` for each target; distill after each round when ``recover``.

    The teacher of every recovery step is the model as it entered the pass (so errors do not
    compound from round to round). Each round's notes get ``accuracy`` (when ``ctx.labels``)
    and ``teacher_agreement`` measured with ONNX Runtime on the pass's dataset.
    """
    from service.engine.training.distillation import (
        Teacher,
        accuracy,
        agreement,
        check_dataset,
        distill_model,
        run_onnx,
    )

    teacher = model
    data = ctx.dataset
    if recover:
        check_dataset(model, data, recovery.min_samples, f"{what} recovery")
    t_first: Any = None
    if data:
        name = teacher.graph.output[0].name
        t_first = run_onnx(teacher, data, [name])[name]
    rounds: list[dict[str, Any]] = []
    current = model
    for index, target in enumerate(targets):
        ctx.check_cancelled()
        base = index / len(targets)
        ctx.progress(base, f"{what}: round {index + 1}/{len(targets)} target {target:g}")
        current, notes = prune(current, target)
        notes = {"round": index + 1, "target": target, **notes}
        if data:
            notes.update(
                _measure(current, data, ctx, t_first, "after_prune", accuracy, agreement, run_onnx)
            )
        if recover:
            assert data is not None

            def round_progress(f: float, m: str, base: float = base) -> None:
                ctx.progress(base + f / len(targets), m)

            current, rnotes = distill_model(
                current,
                [Teacher(teacher, 1.0, "model before pruning")],
                data,
                ctx.labels,
                recovery,
                progress=round_progress,
                check_cancelled=ctx.check_cancelled,
                label=f"{what} recovery {index + 1}",
            )
            notes["recovery"] = rnotes["training"]
            notes.update(
                _measure(
                    current, data, ctx, t_first, "after_recovery", accuracy, agreement, run_onnx
                )
            )
        rounds.append(notes)
    return current, rounds


def _measure(
    model: onnx.ModelProto,
    data: dict[str, Any],
    ctx: PassContext,
    teacher_first: Any,
    tag: str,
    accuracy: Callable[..., float],
    agreement: Callable[..., float],
    run_onnx: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ctx.labels is not None:
        out[f"accuracy_{tag}"] = round(accuracy(model, data, ctx.labels), 4)
    if teacher_first is not None and teacher_first.ndim == 2:
        name = model.graph.output[0].name
        out[f"teacher_agreement_{tag}"] = round(
            agreement(run_onnx(model, data, [name])[name], teacher_first), 4
        )
    return out
