"""``prune_magnitude``: unstructured magnitude pruning of Conv/Gemm/MatMul weights.

Zeroes the smallest-magnitude weights to a target sparsity, per layer or with one global
threshold, skipping layers named in ``nodes_to_exclude`` (formerly ``skip``) and (by default)
the first and last weight layers.
Dense ONNX stores zeros like any other value, so the file does not shrink by itself: the saving
is realised by the zstd-compressed artifact the pipeline stores for such models (the pass notes
both sizes) and compounds with int8 quantization afterwards. With a ``schedule`` the pass prunes
in rounds (e.g. 0.3 → 0.5 → 0.7) and, with ``recover``, distills from the unpruned model after
each round, reporting accuracy per round.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, field_validator

from service.engine.registry import Pass, PassContext, register
from service.engine.scope import LayerScopeConfig, select_layers
from service.engine.sparsity import RecoveryConfig, validate_schedule
from service.engine.training.graph import get_array, serialized_sizes, set_array


class PruneMagnitudeConfig(LayerScopeConfig, RecoveryConfig):
    """Unstructured pruning to ``sparsity`` (or through ``schedule``)."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights set to zero")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer: every layer reaches the sparsity; global: one magnitude "
        "threshold over all pruned layers (layers with small weights lose more)",
    )
    schedule: list[float] | None = Field(
        None, description="iterative targets, e.g. [0.3, 0.5, 0.7]; overrides sparsity"
    )

    _check_schedule = field_validator("schedule")(validate_schedule)


def magnitude_prune(
    model: onnx.ModelProto, weights: list[str], target: float, scope: str
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of ``model`` with ``target`` of the listed weights zeroed by magnitude."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays = {w: get_array(out, w) for w in weights}
    if scope == "global":
        flat = np.concatenate([np.abs(a).reshape(-1) for a in arrays.values()])
        k = int(round(target * flat.size))
        threshold = np.partition(flat, k - 1)[k - 1] if k > 0 else -1.0
    per_layer = {}
    for name, array in arrays.items():
        mags = np.abs(array).reshape(-1)
        if scope == "global":
            mask = mags > threshold
        else:
            k = int(round(target * mags.size))
            mask = np.ones(mags.size, dtype=bool)
            if k > 0:
                mask[np.argpartition(mags, k - 1)[:k]] = False
        pruned = (array.reshape(-1) * mask).reshape(array.shape).astype(array.dtype)
        set_array(out, name, pruned)
        per_layer[name] = round(float((pruned == 0).mean()), 4)
    total = sum(a.size for a in arrays.values())
    zeros = sum(per_layer[n] * arrays[n].size for n in arrays)
    return out, {"sparsity_per_layer": per_layer, "sparsity_pruned_layers": round(zeros / total, 4)}


@register
class PruneMagnitude(Pass[PruneMagnitudeConfig]):
    name = "prune_magnitude"
    config_model = PruneMagnitudeConfig
    quantizes = False
    calibrates = False
    trains = True  # with recover: distillation after each round
    scoped = True
    description = (
        "Unstructured magnitude pruning (per layer or global), first/last layers kept dense; "
        "saves space through the zstd artifact and on top of int8; optional iterative schedule "
        "with distillation recovery."
    )

    def run(
        self, model: onnx.ModelProto, config: PruneMagnitudeConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.training.rounds import run_rounds

        layers, skipped = select_layers(
            model,
            config,
            none_left=lambda skipped: (
                f"prune_magnitude found no layer to prune ({len(skipped)} weight layer(s) skipped)"
            ),
        )
        weights = [w for _, w in layers]
        targets = config.schedule or [config.sparsity]
        result, rounds = run_rounds(
            model,
            targets,
            lambda m, t: magnitude_prune(m, weights, t, config.scope),
            ctx,
            recover=config.recover,
            recovery=config.recovery,
            what="prune_magnitude",
        )
        before, after = serialized_sizes(model), serialized_sizes(result)
        all_weights = [get_array(result, t.name) for t in result.graph.initializer]
        floats = [a for a in all_weights if a.dtype.kind == "f"]
        model_zeros = sum(int((a == 0).sum()) for a in floats) / max(1, sum(a.size for a in floats))
        ctx.notes.update(
            {
                "scope": config.scope,
                "targets": targets,
                "sparsity_per_layer": rounds[-1]["sparsity_per_layer"],
                "sparsity_pruned_layers": rounds[-1]["sparsity_pruned_layers"],
                "sparsity_model": round(model_zeros, 4),
                "skipped": skipped,
                "rounds": rounds,
                "bytes_before": before["bytes"],
                "bytes_after": after["bytes"],
                "bytes_zstd_before": before["bytes_zstd"],
                "bytes_zstd_after": after["bytes_zstd"],
                "storage": "dense ONNX; the saving is realised by the zstd artifact "
                "(and multiplies with int8 quantization)",
            }
        )
        return result
