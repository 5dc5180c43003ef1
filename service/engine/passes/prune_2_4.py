"""``prune_2_4``: 2:4 semi-structured sparsity on Conv/Gemm/MatMul weights.

In every group of four consecutive weights along the input (reduction) dimension, the two of
smallest magnitude are zeroed. The pattern is verified on every pruned weight after pruning
(an internal failure otherwise). Only runtimes with sparse tensor cores speed it up (NVIDIA
Ampere and newer through TensorRT); elsewhere the pass saves space only through the zstd artifact.
Layers whose input dimension is not a multiple of 4 are skipped and named in the notes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from service.engine.errors import EngineError
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import LayerScopeConfig, require, select_layers
from service.engine.sparsity import RecoveryConfig, input_axis
from service.engine.training.graph import get_array, serialized_sizes, set_array

ACCELERATION_NOTE = (
    "2:4 sparsity is accelerated only by NVIDIA Ampere or newer GPUs through TensorRT "
    "(sparse tensor cores); other targets only gain compressed size"
)


class Prune24Config(LayerScopeConfig, RecoveryConfig):
    """2:4 pruning along the input dimension; optional distillation recovery afterwards."""


def _groups(weight: np.ndarray, axis: int) -> np.ndarray:
    """View ``weight`` as [..., 4] groups of consecutive entries along ``axis``."""
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(-1, 4)


def prune_2_4_array(weight: np.ndarray, axis: int) -> np.ndarray:
    """Zero the two smallest of every four consecutive weights along ``axis``."""
    moved = np.moveaxis(weight, axis, -1).copy()
    groups = moved.reshape(-1, 4)
    drop = np.argsort(np.abs(groups), axis=1, kind="stable")[:, :2]
    np.put_along_axis(groups, drop, 0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def satisfies_2_4(weight: np.ndarray, axis: int) -> bool:
    """True when every group of four along ``axis`` has at most two non-zeros."""
    return bool(((_groups(weight, axis) != 0).sum(axis=1) <= 2).all())


@register
class Prune24(Pass[Prune24Config]):
    name = "prune_2_4"
    config_model = Prune24Config
    quantizes = False
    calibrates = False
    trains = True  # with recover: distillation after pruning
    scoped = True
    description = (
        "2:4 semi-structured sparsity along the input dimension of Conv/Gemm/MatMul weights "
        "(verified on every pruned weight); accelerated by NVIDIA Ampere+ with TensorRT only."
    )

    def run(
        self, model: onnx.ModelProto, config: Prune24Config, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.training.rounds import run_rounds

        layers, skipped = select_layers(model, config)
        chosen: list[tuple[str, int]] = []
        for node, weight in layers:
            array = get_array(model, weight)
            axis = input_axis(node, array)
            if array.shape[axis] % 4:
                skipped[weight] = f"input dimension {array.shape[axis]} is not a multiple of 4"
            else:
                chosen.append((weight, axis))
        require(
            chosen, skipped, "prune_2_4 found no layer whose input dimension is a multiple of 4"
        )

        def prune(m: onnx.ModelProto, target: float) -> tuple[onnx.ModelProto, dict[str, Any]]:
            out = onnx.ModelProto()
            out.CopyFrom(m)
            for weight, axis in chosen:
                set_array(out, weight, prune_2_4_array(get_array(out, weight), axis))
            return out, {}

        result, rounds = run_rounds(
            model,
            [0.5],
            prune,
            ctx,
            recover=config.recover,
            recovery=config.recovery,
            what="prune_2_4",
        )
        per_layer = {}
        for weight, axis in chosen:
            array = get_array(result, weight)
            if not satisfies_2_4(array, axis):  # recovery keeps zeros; a breach is a bug
                raise EngineError(
                    "pass_failed", f"2:4 pattern does not hold on weight {weight!r} after pruning"
                )
            per_layer[weight] = round(float((array == 0).mean()), 4)
        before, after = serialized_sizes(model), serialized_sizes(result)
        ctx.notes.update(
            {
                "pattern": "2:4 along the input dimension",
                "verified": True,
                "sparsity_per_layer": per_layer,
                "skipped": skipped,
                "rounds": rounds,
                "bytes_zstd_before": before["bytes_zstd"],
                "bytes_zstd_after": after["bytes_zstd"],
                "acceleration": ACCELERATION_NOTE,
            }
        )
        return result
