"""``prune_channels``: structured pruning of Conv/Gemm/MatMul output channels, graph rewired.

For each prunable layer the channels with the smallest L1 (or L2) weight norm are removed, and
every tensor that carries those channels is cut to match:

- the layer's own weight (output axis) and bias;
- BatchNormalization scale/bias/mean/variance after it;
- per-channel constants of elementwise ops (``Add``/``Mul``/``Sub``/``Div`` with an
  initializer, e.g. an exported bias);
- the input channels of the consuming Conv, Gemm or MatMul, including through ``Flatten``
  (each channel owns a block of H*W flattened features).

Channel-preserving ops (activations, pooling, Dropout, Identity, BatchNormalization) are
followed. A layer whose channels reach anything else is skipped with the reason in the notes:
a graph output (the last layer), a residual ``Add``/``Concat`` that ties its channels to another
branch (tied groups are skipped, not pruned together), a reshape or transpose, a normalisation
over channels. The pruned model is a smaller dense graph: fewer FLOPs, lower latency, still
valid ONNX. With ``schedule`` and ``recover`` it prunes in rounds with distillation between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, field_validator

from service.engine.errors import EngineError
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import LayerScopeConfig, require, select_layers
from service.engine.sparsity import RecoveryConfig, input_axis, output_axis, validate_schedule
from service.engine.training.graph import (
    attr,
    consumers,
    count_macs,
    get_array,
    initializers,
    serialized_sizes,
    set_array,
    value_shapes,
)

# Ops that keep the channel axis and the channel set unchanged.
_TRANSPARENT = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "Gelu",
    "Elu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Erf",
    "Dropout",
    "Identity",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Cast",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


class PruneChannelsConfig(LayerScopeConfig, RecoveryConfig):
    """Remove a fraction of output channels from every prunable Conv/Gemm/MatMul."""

    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of output channels removed")
    criterion: Literal["l1", "l2"] = Field("l1", description="channel importance: weight norm")
    schedule: list[float] | None = Field(
        None, description="iterative ratios, e.g. [0.25, 0.5]; overrides ratio"
    )
    exclude_first: bool = Field(False, description="leave the first layer whole")
    exclude_last: bool = Field(
        False,
        description="leave the last layer whole (the model's last layer is never prunable "
        "anyway: its channels are the model's outputs)",
    )
    min_elements: int = Field(1, ge=1, description="weights smaller than this are not pruned")
    min_channels: int = Field(4, ge=1, description="never keep fewer channels than this")

    _check_schedule = field_validator("schedule")(validate_schedule)


@dataclass
class ChannelGroup:
    """A prunable layer and every edit that removing its channels implies."""

    node: onnx.NodeProto
    weight: str
    axis: int  # output-channel axis of the weight
    channels: int
    # (initializer name, axis, block): slice ``axis`` keeping whole blocks of size ``block``
    edits: list[tuple[str, int, int]] = field(default_factory=list)


def analyse(
    model: onnx.ModelProto, config: PruneChannelsConfig
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Find prunable layers and the edits each implies; the others with a reason."""
    inits = initializers(model)
    uses = consumers(model)
    shapes = value_shapes(model)
    outputs = {o.name for o in model.graph.output}
    constants = set(inits) | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    weight_uses = {name: len(uses.get(name, [])) for name in inits}
    groups: list[ChannelGroup] = []
    layers, skipped = select_layers(model, config)
    for node, weight in layers:
        w = get_array(model, weight)
        if weight_uses[weight] > 1:
            skipped[weight] = "weight shared by several nodes"
            continue
        if node.op_type == "Conv" and int(attr(node, "group", 1)) != 1:
            skipped[weight] = "grouped/depthwise convolution"
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            skipped[weight] = "Gemm with transA"
            continue
        if node.op_type == "MatMul" and w.ndim != 2:
            skipped[weight] = "batched MatMul weight"
            continue
        axis = output_axis(node, w)
        group = ChannelGroup(node, weight, axis, int(w.shape[axis]))
        group.edits.append((weight, axis, 1))
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in inits or weight_uses[bias] > 1:
                skipped[weight] = "bias is not a private initializer"
                continue
            bias_shape = list(inits[bias].dims)
            if bias_shape and bias_shape[-1] == group.channels:
                group.edits.append((bias, len(bias_shape) - 1, 1))
            elif int(np.prod(bias_shape)) != 1:
                skipped[weight] = "bias does not broadcast per channel"
                continue
        out_rank = len(shapes.get(node.output[0], [])) or None
        channel_axis = 1 if node.op_type == "Conv" else (out_rank - 1 if out_rank else 1)
        reason = _trace(
            node.output[0],
            channel_axis,
            1,
            group,
            model,
            uses,
            shapes,
            inits,
            constants,
            outputs,
            weight_uses,
        )
        if reason:
            skipped[weight] = reason
            continue
        groups.append(group)
    return groups, skipped


def _trace(
    start: str,
    channel_axis: int,
    block: int,
    group: ChannelGroup,
    model: onnx.ModelProto,
    uses: dict[str, list[onnx.NodeProto]],
    shapes: dict[str, list[Any]],
    inits: dict[str, onnx.TensorProto],
    constants: set[str],
    outputs: set[str],
    weight_uses: dict[str, int],
) -> str | None:
    """Follow the channels of ``start`` to their consumers; return why not prunable, or None."""
    stack = [(start, channel_axis, block)]
    seen: set[str] = set()
    visited_nodes: list[onnx.NodeProto] = []
    while stack:
        tensor, axis, blk = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in outputs:
            return "its channels are a model output"
        for user in uses.get(tensor, []):
            op = user.op_type
            if op in _TRANSPARENT:
                stack.append((user.output[0], axis, blk))
            elif op == "BatchNormalization" and user.input[0] == tensor and blk == 1:
                for name in user.input[1:5]:
                    if name not in inits or weight_uses[name] > 1:
                        return "BatchNormalization parameters are not private initializers"
                    group.edits.append((name, 0, 1))
                stack.append((user.output[0], axis, blk))
            elif op in _ELEMENTWISE:
                rank = len(shapes.get(tensor, []))
                for other in user.input:
                    if other == tensor or other not in constants:
                        continue
                    if other not in inits or weight_uses[other] > 1:
                        return f"{op} with a constant that is not a private initializer"
                    dims = list(inits[other].dims)
                    if int(np.prod(dims)) == 1:
                        continue
                    if not rank:
                        return f"{op} with a constant on a tensor of unknown rank"
                    caxis = axis - (rank - len(dims))
                    if 0 <= caxis < len(dims) and dims[caxis] != 1:
                        if blk != 1:
                            return f"{op} with a per-feature constant after flattening"
                        group.edits.append((other, caxis, 1))
                visited_nodes.append(user)
                stack.append((user.output[0], axis, blk))
            elif op == "Flatten" and int(attr(user, "axis", 1)) == 1 and axis == 1:
                in_shape = shapes.get(tensor, [])
                spatial = in_shape[2:]
                if not all(isinstance(d, int) for d in spatial):
                    return "Flatten of a tensor with unknown spatial size"
                stack.append((user.output[0], 1, blk * int(np.prod(spatial or [1]))))
            elif op in ("Conv", "Gemm", "MatMul") and user.input[0] == tensor:
                w_name = user.input[1] if len(user.input) > 1 else ""
                if w_name not in inits or weight_uses.get(w_name, 0) > 1:
                    return f"consumer {op} has no private weight initializer"
                w = get_array(model, w_name)
                if op == "Conv":
                    if axis != 1 or blk != 1 or int(attr(user, "group", 1)) != 1:
                        return "consumer Conv is grouped or reads another axis"
                elif op == "Gemm" and attr(user, "transA", 0):
                    return "consumer Gemm uses transA"
                elif op == "MatMul" and w.ndim != 2:
                    return "consumer MatMul has a batched weight"
                rank = len(shapes.get(tensor, [])) or 2
                if op != "Conv" and axis != rank - 1:
                    return f"consumer {op} reads a non-feature axis"
                group.edits.append((w_name, input_axis(user, w), blk))
            else:
                return f"its channels reach {op} (node {user.name or '?'})"
    for node in visited_nodes:  # a binary op mixing in another branch ties the channels
        for name in node.input:
            if name and name not in constants and name not in seen:
                return f"channels tied to another branch by {node.op_type} (residual); skipped"
    return None


def _keep_indices(weight: np.ndarray, axis: int, keep: int, criterion: str) -> np.ndarray:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    score = np.abs(moved).sum(1) if criterion == "l1" else np.sqrt((moved**2).sum(1))
    return np.sort(np.argsort(-score, kind="stable")[:keep])


def prune_groups(
    model: onnx.ModelProto,
    groups: list[ChannelGroup],
    original_channels: dict[str, int],
    ratio: float,
    config: PruneChannelsConfig,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of ``model`` with each group cut to ``(1 - ratio)`` of its original channels."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    # Inferred shapes of the old graph would contradict the new one.
    del out.graph.value_info[:]
    kept: dict[str, dict[str, int]] = {}
    for g in groups:
        original = original_channels.get(g.weight, g.channels)
        keep = max(config.min_channels, int(round(original * (1 - ratio))))
        if keep >= g.channels:
            kept[g.weight] = {"before": g.channels, "after": g.channels}
            continue
        idx = _keep_indices(get_array(model, g.weight), g.axis, keep, config.criterion)
        for name, axis, block in g.edits:
            array = get_array(out, name)
            cols = (idx[:, None] * block + np.arange(block)[None, :]).reshape(-1)
            set_array(out, name, np.take(array, cols, axis=axis))
        kept[g.weight] = {"before": g.channels, "after": int(keep)}
    return out, {"channels": kept}


@register
class PruneChannels(Pass[PruneChannelsConfig]):
    name = "prune_channels"
    config_model = PruneChannelsConfig
    quantizes = False
    calibrates = False
    trains = True  # with recover: distillation after each round
    scoped = True
    description = (
        "Structured output-channel pruning of Conv/Gemm/MatMul by weight norm with the graph "
        "rewired (bias, BatchNorm, per-channel constants, consumers, Flatten); residual-tied "
        "channels are skipped. Fewer FLOPs, lower latency."
    )

    def run(
        self, model: onnx.ModelProto, config: PruneChannelsConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.training.rounds import run_rounds

        groups, skipped = analyse(model, config)
        require(groups, skipped, "prune_channels found no layer whose channels can be removed")
        original = {g.weight: g.channels for g in groups}

        def prune(m: onnx.ModelProto, ratio: float) -> tuple[onnx.ModelProto, dict[str, Any]]:
            current, _ = analyse(m, config)
            current = [g for g in current if g.weight in original]
            return prune_groups(m, current, original, ratio, config)

        targets = config.schedule or [config.ratio]
        result, rounds = run_rounds(
            model,
            targets,
            prune,
            ctx,
            recover=config.recover,
            recovery=config.recovery,
            what="prune_channels",
        )
        try:
            onnx.checker.check_model(result, full_check=True)
        except Exception as exc:  # the rewiring must keep the graph valid; say which check
            raise EngineError(
                "pass_failed", f"pruned graph does not validate: {type(exc).__name__}: {exc}"
            ) from None
        macs_before, macs_after = count_macs(model), count_macs(result)
        params_before = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        params_after = sum(int(np.prod(t.dims)) for t in result.graph.initializer)
        ctx.notes.update(
            {
                "criterion": config.criterion,
                "targets": targets,
                "channels": rounds[-1]["channels"],
                "skipped": skipped,
                "rounds": rounds,
                "macs_before": macs_before,
                "macs_after": macs_after,
                "flops_reduction": round(macs_before / max(macs_after, 1), 3),
                "params_before": params_before,
                "params_after": params_after,
                "bytes_before": serialized_sizes(model)["bytes"],
                "bytes_after": serialized_sizes(result)["bytes"],
            }
        )
        return result
