"""``int4_weight_only``: 4-bit blockwise weights for MatMul layers (``MatMulNBits``).

ONNX Runtime's ``MatMulNBitsQuantizer`` (round-to-nearest, blockwise along K) replaces each
``MatMul`` whose B is a constant 2-D weight with a ``com.microsoft.MatMulNBits`` node holding
packed 4-bit weights, one float scale per ``block_size`` values (and a 4-bit zero point per block
when asymmetric). It walks If/Loop/Scan bodies too. ``Gemm`` layers are rewritten as MatMul+Add
first so they are reached as well.

Size: 4 bits per weight + 32/block_size bits of scale (+4/block_size of zero point): ~6.4x
smaller than float32 at block 32, ~7x at block 64 (the default), when MatMul weights dominate. Only MatMul/Gemm weights are
touched: convolutions, recurrent layers and embeddings stay float (notes say how many bytes).
The result needs ONNX Runtime (contrib op). ``accuracy_level`` picks the compute type of the
CPU kernel: 4 = int8 activations (fastest on x86 with VNNI/AMX), 1 = float32 (most exact).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import Field, field_validator

from service.engine.errors import EngineError
from service.engine.graph import (
    all_nodes,
    ensure_opset,
    float_weight_bytes,
    gemm_to_matmul,
    iter_graphs,
    op_histogram,
)
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import EXCLUDED, ScopeConfig, nodes_to_exclude_field, require, scope_of


class Int4WeightOnlyConfig(ScopeConfig):
    """Blockwise int4 weight-only quantization of MatMul/Gemm weights."""

    block_size: int = Field(
        64,
        ge=16,
        le=256,
        description="Weights per scale along K (power of two, 16..256): smaller = more "
        "accurate, larger = smaller file.",
    )
    symmetric: bool = Field(
        True,
        description="Symmetric blocks (no zero points, smaller); asymmetric adds a 4-bit zero "
        "point per block and is more accurate on skewed weights.",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="CPU compute type of MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "activations (fastest on x86 with VNNI).",
    )
    min_elements: int = Field(
        4096, ge=1, description="MatMul weights with fewer elements stay float."
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field(
        "Node names kept in float (sensitive layers)."
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128 or 256)")
        return value


def _matmul_weights(model: onnx.ModelProto) -> list[tuple[str, str, int, bool]]:
    """(node name, weight name, elements, in_subgraph) for MatMuls with a 2-D float constant B."""
    out = []
    visible: dict[str, onnx.TensorProto] = {}
    for graph, depth in iter_graphs(model.graph):
        visible.update({t.name: t for t in graph.initializer})
        for node in graph.node:
            if node.op_type != "MatMul" or len(node.input) < 2:
                continue
            t = visible.get(node.input[1])
            if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
                out.append((node.name, t.name, int(np.prod(t.dims)), depth > 0))
    return out


@register
class Int4WeightOnly(Pass[Int4WeightOnlyConfig]):
    """4-bit blockwise weight-only quantization (MatMulNBits)."""

    name = "int4_weight_only"
    config_model = Int4WeightOnlyConfig
    quantizes = True
    calibrates = False
    trains = False
    scoped = True
    description = (
        "4-bit blockwise weights for MatMul/Gemm layers (ONNX Runtime MatMulNBits, RTN): ~6x "
        "smaller transformers and MLPs; other ops stay float. Needs ONNX Runtime."
    )

    def run(
        self, model: onnx.ModelProto, config: Int4WeightOnlyConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        work = onnx.ModelProto()
        work.CopyFrom(model)
        work = ensure_opset(work, 13)
        bytes_before = model.ByteSize()
        scope = scope_of(config)
        gemms = {
            n.name for n in work.graph.node if n.op_type == "Gemm" and not scope.excludes(n.name)
        }
        rewritten = gemm_to_matmul(work, gemms) if gemms else []

        candidates = _matmul_weights(work)
        skipped = []
        exclude = set(scope.nodes_to_exclude)
        for node, _weight, numel, _sub in candidates:
            if scope.excludes(node):
                skipped.append({"node": node, "reason": EXCLUDED})
            elif numel < config.min_elements:
                skipped.append({"node": node, "reason": f"{numel} elements < min_elements"})
                exclude.add(node)
        targets = require(
            [c for c in candidates if c[0] not in exclude],
            skipped,
            lambda _: (
                "no MatMul/Gemm with a constant 2-D float weight of at least "
                f"{config.min_elements} elements: int4 weight-only has nothing to compress "
                f"(the model's ops: {', '.join(sorted(op_histogram(model))[:15])})"
            ),
        )
        ctx.progress(0.2, f"int4 quantization of {len(targets)} MatMul weights")
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level or None,
        )
        # The quantizer logs every node at INFO level; keep the worker's log readable.
        logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            quantizer = MatMulNBitsQuantizer(
                work,
                bits=4,
                block_size=config.block_size,
                is_symmetric=config.symmetric,
                accuracy_level=config.accuracy_level or None,
                nodes_to_exclude=sorted(exclude),
                algo_config=algo,
            )
            quantizer.process()
        except Exception as exc:  # library failure -> pass failure, with its reason
            raise EngineError(
                "pass_failed",
                "int4 quantization failed: " + str(exc).strip().splitlines()[0][:300],
            ) from None
        finally:
            logger.setLevel(level)
        out = quantizer.model.model
        nbits = [n.name for n in all_nodes(out) if n.op_type == "MatMulNBits"]
        debug_bytes = strip_debug_metadata(out)
        bytes_after = out.ByteSize()
        left = float_weight_bytes(out)
        ctx.notes.update(
            {
                "quantized": len(nbits),
                "quantized_nodes": nbits[:200],
                "gemm_as_matmul": rewritten,
                "skipped": skipped,
                "block_size": config.block_size,
                "symmetric": config.symmetric,
                "accuracy_level": config.accuracy_level,
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
                "float_weight_bytes_left": left,
                "debug_metadata_bytes_removed": debug_bytes,
                "note": "weights of Conv, LSTM/GRU, Gather and small MatMuls stay float",
            }
        )
        if not nbits or bytes_after >= bytes_before:
            raise EngineError(
                "no_effect",
                f"int4 quantization changed nothing ({len(nbits)} MatMulNBits, {bytes_before} -> "
                f"{bytes_after} bytes)",
            )
        return out
