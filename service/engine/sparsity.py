"""What the pruning passes share: schedules, distillation recovery, the axes of a layer's weight.

Light (numpy, onnx, pydantic): the pass modules that import this stay light for the API process.
"""

from __future__ import annotations

import numpy as np
import onnx
from pydantic import Field

from service.engine.registry import PassConfig
from service.engine.training.graph import attr
from service.engine.training.settings import RecoverySettings


def validate_schedule(schedule: list[float] | None) -> list[float] | None:
    """A schedule is a strictly increasing list of fractions in (0, 1)."""
    if schedule is None:
        return None
    if not schedule:
        raise ValueError("schedule must not be empty")
    if any(not 0 < s < 1 for s in schedule):
        raise ValueError("schedule values must be fractions between 0 and 1")
    if any(b <= a for a, b in zip(schedule, schedule[1:], strict=False)):
        raise ValueError("schedule must be strictly increasing")
    return schedule


class RecoveryConfig(PassConfig):
    """Distillation from the unpruned model after pruning (``service.engine.training.rounds``)."""

    recover: bool = Field(
        False,
        description="distill from the unpruned model after each pruning round (needs a dataset)",
    )
    recovery: RecoverySettings = Field(
        default_factory=lambda: RecoverySettings.model_validate({}),
        description="the recovery distillation: loss and (smaller) training budget",
    )


def input_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The reduction (input-feature) axis of a Conv/Gemm/MatMul weight."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return weight.ndim - 2  # MatMul: [..., K, N]


def output_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The output-channel axis of a Conv/Gemm/MatMul weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return weight.ndim - 1
