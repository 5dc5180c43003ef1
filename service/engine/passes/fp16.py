"""``fp16``: float16 weights and compute, float32 kept where fp16 loses accuracy.

Built on ONNX Runtime's ``float16.convert_float_to_float16`` (which walks If/Loop/Scan bodies
too), with:

- model inputs and outputs kept float32 (``Cast`` nodes inserted), so callers see no change;
- a block list of ops that stay float32 because fp16's 10-bit mantissa and 65504 range break
  them: exponentials and logs (overflow), reductions and cumulative sums (accumulation error),
  normalisations (variance of small numbers), softmax; plus ONNX Runtime's own list (ops without
  fp16 kernels, ML ops, Range, TopK...). ``op_types_to_exclude`` (formerly ``op_block_list``)
  replaces it, ``nodes_to_exclude`` adds node names;
- the number of weight values outside fp16's range (clamped) in the notes.

fp16 halves the file. Whether it is faster depends on the target: GPUs and ARM CPUs with fp16
arithmetic gain, most x86 CPUs convert back and forth and are slower than float32.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.graph import all_nodes, float_weights, iter_graphs, toposort
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import ScopeConfig, nodes_to_exclude_field, scope_of

# Ops kept float32 for accuracy, on top of ONNX Runtime's DEFAULT_OP_BLOCK_LIST.
ACCURACY_BLOCK_LIST = [
    "Exp",
    "Log",
    "Pow",
    "Reciprocal",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
]

_FP16_MAX = 65504.0
_FP16_MIN_POSITIVE = 5.96e-08


class Fp16Config(ScopeConfig):
    """float16 conversion with float32 I/O and a block list of accuracy-sensitive ops."""

    legacy_names: ClassVar[frozenset[str]] = frozenset({"op_block_list"})

    op_types_to_exclude: list[str] | None = Field(
        None,
        description="Op types kept float32 (formerly op_block_list). None = exponentials, logs, "
        "reductions, softmax and normalisations, plus ONNX Runtime's default list (ops without "
        "fp16 kernels).",
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field(
        "Node names kept float32 (sensitive layers)."
    )
    keep_io_types: bool = Field(
        True, description="Keep float32 model inputs/outputs (Cast nodes inside the model)."
    )


def _out_of_range(model: onnx.ModelProto) -> int:
    """Float32 weight values fp16 cannot hold (|w| > 65504, or 0 < |w| < 5.96e-8)."""
    total = 0
    for graph, _ in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_type == TensorProto.FLOAT:
                a = np.abs(numpy_helper.to_array(t))
                total += int(np.sum(a > _FP16_MAX) + np.sum((a > 0) & (a < _FP16_MIN_POSITIVE)))
    return total


def _drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes identical to an earlier one (same op, inputs and outputs).

    ONNX Runtime's converter inserts one ``Cast`` per blocked consumer of a shared float16
    initializer, all with the same name and output: the model would be invalid.
    """
    removed = 0
    for graph, _ in iter_graphs(model.graph):
        seen: set[bytes] = set()
        produced: set[str] = set()
        keep = []
        for node in graph.node:
            key = node.SerializeToString(deterministic=True)
            if key in seen and set(node.output) <= produced:
                removed += 1
                continue
            seen.add(key)
            produced.update(node.output)
            keep.append(node)
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)
    return removed


@register
class Fp16(Pass[Fp16Config]):
    """Convert weights and compute to float16, keeping sensitive ops and the I/O in float32."""

    name = "fp16"
    config_model = Fp16Config
    quantizes = True
    calibrates = False
    trains = False
    scoped = True
    description = (
        "float16 weights and compute (2x smaller), float32 inputs/outputs, accuracy-sensitive "
        "ops (exp, log, reductions, softmax, normalisations) kept float32; fast on GPUs/ARM."
    )

    def run(self, model: onnx.ModelProto, config: Fp16Config, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        count_before, bytes_before = float_weights(model, double=False)
        if count_before == 0:
            raise EngineError(
                "no_effect",
                "the model has no float32 weights to convert to float16",
            )
        scope = scope_of(config)
        block = (
            list(scope.op_types_to_exclude)
            if scope.op_types_to_exclude is not None
            else sorted(set(DEFAULT_OP_BLOCK_LIST) | set(ACCURACY_BLOCK_LIST))
        )
        clamped = _out_of_range(model)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        ctx.progress(0.2, "converting to float16")
        try:
            out = convert_float_to_float16(
                work,
                keep_io_types=config.keep_io_types,
                op_block_list=block,
                node_block_list=list(scope.nodes_to_exclude),
            )
        except Exception as exc:  # library failure -> pass failure, with its reason
            raise EngineError(
                "pass_failed",
                "float16 conversion failed: " + str(exc).strip().splitlines()[0][:300],
            ) from None
        _drop_duplicate_nodes(out)
        toposort(out)
        debug_bytes = strip_debug_metadata(out)
        count_after, bytes_after = float_weights(out, double=False)
        present = {n.op_type for n in all_nodes(model)}
        kept = sorted(
            n.name or n.op_type
            for n in all_nodes(out)
            if n.op_type in block or scope.excludes(n.name)
        )
        ctx.notes.update(
            {
                "float32_weights_before": count_before,
                "float32_weights_after": count_after,
                "float32_weight_bytes_after": bytes_after,
                "blocked_op_types_present": sorted(present & set(block)),
                "nodes_kept_float32": kept[:200],
                "casts_added": sum(1 for n in all_nodes(out) if n.op_type == "Cast")
                - sum(1 for n in all_nodes(model) if n.op_type == "Cast"),
                "values_clamped_to_fp16_range": clamped,
                "debug_metadata_bytes_removed": debug_bytes,
                "io_types": "float32" if config.keep_io_types else "float16",
                "note": "fp16 is faster on GPUs and fp16-capable ARM CPUs; most x86 CPUs run it "
                "slower than float32",
            }
        )
        if bytes_after >= bytes_before or out.ByteSize() >= model.ByteSize():
            raise EngineError(
                "no_effect",
                "no float32 weight could be converted: every weight feeds a blocked op "
                f"({', '.join(sorted(present & set(block))) or 'none'}) or an excluded node",
            )
        return out
