"""``quantize_dynamic``: int8 weights, activations quantized on the fly at run time.

What it does better than the plain one-call ``onnxruntime.quantization.quantize_dynamic``:

- Only the ops where dynamic int8 pays off are touched by default: MatMul, Gemm, LSTM, GRU and
  Attention. ``Conv`` is left out on purpose: ONNX Runtime's dynamic ``ConvInteger`` path
  quantizes the activations of every convolution at run time and is several times slower than
  float on CPU (use ``quantize_static`` for CNNs). It can still be asked for in ``op_types``.
- ``Gemm`` with a constant weight is rewritten as ``MatMul`` + ``Add`` first, so it gets ONNX
  Runtime's fused dynamic int8 MatMul kernel (the one-call API leaves Gemm in float).
- Per-channel weight scales where they help: ONNX Runtime's per-tensor dynamic MatMul is
  the fastest, so ``per_channel="auto"`` measures each weight's int8 SQNR both ways and goes
  per channel only when a weight would lose > 6 dB and fall under 35 dB per tensor.
- Ops ONNX Runtime has no dynamic int8 kernel for (``GRU``), and every weight inside If/Loop/Scan
  bodies (ONNX Runtime's quantizer does not descend into subgraphs unless asked, and then only
  for the ops it knows), are stored as int8 with a ``DequantizeLinear`` in front: the file
  shrinks 4x for those weights and the op keeps computing in float ("weight-only int8").
- Embedding tables (the data of ``Gather``) are stored int8 with one scale per row and
  dequantized after the lookup (``int8.gather_rows_int8``): in a BERT-style encoder they hold
  most of the bytes. ONNX Runtime's own Gather path uses one scale for the whole table.
- Tensors smaller than ``min_elements`` stay float (their scale would cost more than it saves),
  and a result that is not smaller than its input is refused (``no_effect``).

``ctx.notes`` lists every candidate node with what was done to it and why.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.graph import (
    all_nodes,
    ensure_opset,
    float_weight_bytes,
    gemm_to_matmul,
    iter_graphs,
    tensor_uses,
)
from service.engine.int8 import (
    WEIGHT_INPUTS,
    choose_per_channel,
    gather_rows_int8,
    weight_only_int8,
)
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import SMALLER_RATIO, Pass, PassContext, register
from service.engine.scope import EXCLUDED, ScopeConfig, nodes_to_exclude_field, scope_of

DynamicOp = Literal["MatMul", "Gemm", "LSTM", "GRU", "Attention", "Conv", "Gather"]
_DEFAULT_DYNAMIC_OPS: tuple[DynamicOp, ...] = ("MatMul", "Gemm", "LSTM", "GRU", "Attention",
                                                "Gather")

# Ops ONNX Runtime's dynamic quantizer turns into integer kernels (Gather is done here, per row).
_ORT_DYNAMIC = {"MatMul", "Attention", "LSTM", "Conv"}


class QuantizeDynamicConfig(ScopeConfig):
    """Dynamic int8 quantization (int8 weights, activations quantized per call)."""

    op_types: list[DynamicOp] = Field(
        default_factory=lambda: list(_DEFAULT_DYNAMIC_OPS),
        description="Op types to quantize (Gather: embedding tables, int8 with one scale per "
        "row). Conv is excluded by default: dynamic int8 convolutions are several times slower "
        "than float on CPU; use quantize_static for CNNs.",
    )
    per_channel: bool | Literal["auto"] = Field(
        "auto",
        description="Weight scales per output channel (accurate on uneven weights, slower "
        "dynamic int8 MatMul kernels in ONNX Runtime) or per tensor (fastest). auto = per "
        "tensor unless a weight would lose more than 6 dB SQNR to it and fall under 35 dB.",
    )
    weight_type: Literal["int8", "uint8"] = Field(
        "int8", description="Storage type of quantized weights (int8 = symmetric)."
    )
    reduce_range: bool | None = Field(
        None,
        description="Quantize weights to 7 bits: avoids int16 saturation on x86 CPUs without "
        "VNNI/AMX (pre-Cascade Lake, AVX2-only EPYC). None = chosen for the job's target and "
        "measuring host (recorded in the notes).",
    )
    min_elements: int = Field(
        1024, ge=1, description="Weights with fewer elements stay float (not worth a scale)."
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field()
    subgraph_weights: Literal["int8_weight_only", "keep_float"] = Field(
        "int8_weight_only",
        description="Weights inside If/Loop/Scan bodies: store as int8 + DequantizeLinear "
        "(smaller file, float compute) or keep them float.",
    )


def _candidates(
    model: onnx.ModelProto, op_types: set[str]
) -> list[tuple[onnx.NodeProto, str | None, int]]:
    """Main-graph nodes of ``op_types`` with (node, first weight initializer or None, numel)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        weight, numel = None, 0
        for index in WEIGHT_INPUTS.get(node.op_type, {}):
            if index < len(node.input) and node.input[index] in inits:
                t = inits[node.input[index]]
                if t.data_type == TensorProto.FLOAT:
                    weight = node.input[index]
                    numel = max(numel, int(np.prod(t.dims)) if t.dims else 1)
        out.append((node, weight, numel))
    return out


# --------------------------------------------------------------------------- the pass


@register
class QuantizeDynamic(Pass[QuantizeDynamicConfig]):
    """Dynamic int8 quantization for MatMul/Gemm/LSTM/GRU/Attention (CPU inference)."""

    name = "quantize_dynamic"
    config_model = QuantizeDynamicConfig
    quantizes = True
    calibrates = False
    trains = False
    scoped = True
    description = (
        "int8 weights with activations quantized at run time: MatMul/Gemm/LSTM/Attention use "
        "ONNX Runtime's integer kernels, embedding tables are int8 rows with per-row scales, "
        "GRU and subgraph weights are stored int8 (weight-only)."
    )

    def run(
        self, model: onnx.ModelProto, config: QuantizeDynamicConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

        work = onnx.ModelProto()
        work.CopyFrom(model)
        work = ensure_opset(work)
        bytes_before = model.ByteSize()
        wanted: set[str] = set(config.op_types)
        scope = scope_of(config)
        exclude = set(scope.nodes_to_exclude)
        notes: dict = {"quantized": [], "weight_only_int8": [], "skipped": []}

        # 1. Gemm -> MatMul (+Add) so Gemm gets the dynamic int8 MatMul kernel.
        if "Gemm" in wanted:
            gemms = {
                n.name
                for n, w, numel in _candidates(work, {"Gemm"})
                if w and numel >= config.min_elements and not scope.excludes(n.name)
            }
            notes["gemm_as_matmul"] = gemm_to_matmul(work, gemms) if gemms else []
            wanted_ort = (wanted & _ORT_DYNAMIC) | {"MatMul"}
        else:
            wanted_ort = wanted & _ORT_DYNAMIC

        # 2. Main graph: ONNX Runtime's dynamic quantizer on the ops it has kernels for.
        ort_nodes = []
        ort_exclude = []
        for node, weight, numel in _candidates(work, wanted_ort):
            label = {"node": node.name, "op": node.op_type}
            if scope.excludes(node.name):
                notes["skipped"].append({**label, "reason": EXCLUDED})
                ort_exclude.append(node.name)
            elif weight is None:
                notes["skipped"].append(
                    {**label, "reason": "no constant float weight (both inputs are activations)"}
                )
                ort_exclude.append(node.name)
            elif numel < config.min_elements:
                notes["skipped"].append(
                    {**label, "reason": f"weight has {numel} elements < min_elements"}
                )
                ort_exclude.append(node.name)
            else:
                ort_nodes.append((node.name, node.op_type, weight))
        per_channel = config.per_channel
        if per_channel == "auto":
            per_channel, evidence = choose_per_channel(work, ort_nodes)
            notes["per_channel_reason"] = (
                f"per channel: {len(evidence)} weight(s) lose > 6 dB per tensor"
                if per_channel
                else "per tensor: every weight keeps >= 35 dB SQNR or gains < 6 dB per channel "
                "(ONNX Runtime's per-tensor dynamic MatMul is the fastest)"
            )
            notes["per_channel_evidence"] = evidence[:20]
        encoding = ctx.int8_encoding(config.reduce_range, config.weight_type)
        if ort_nodes:
            notes["encoding"] = encoding.as_notes()
            ctx.progress(0.2, f"ONNX Runtime dynamic int8 on {len(ort_nodes)} nodes")
            src, dst = ctx.workdir / "qd_in.onnx", ctx.workdir / "qd_out.onnx"
            onnx.save_model(work, str(src))
            weight_type = QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8
            try:
                ort_quantize_dynamic(
                    str(src),
                    str(dst),
                    op_types_to_quantize=sorted({op for _, op, _ in ort_nodes}),
                    per_channel=per_channel,
                    reduce_range=encoding.reduce_range,
                    weight_type=weight_type,
                    nodes_to_exclude=ort_exclude,
                    extra_options={"MatMulConstBOnly": True},
                )
            except Exception as exc:  # library failure -> pass failure, with its reason
                raise EngineError(
                    "pass_failed",
                    "ONNX Runtime's dynamic quantizer failed: "
                    + str(exc).strip().splitlines()[0][:300],
                ) from None
            work = onnx.load(str(dst))
            remaining = {t.name for t in work.graph.initializer}
            for node_name, op, weight in ort_nodes:
                if weight not in remaining and f"{weight}_quantized" in remaining:
                    notes["quantized"].append(
                        {"node": node_name, "op": op, "kernel": "dynamic int8 (ONNX Runtime)"}
                    )
                else:
                    notes["skipped"].append(
                        {
                            "node": node_name,
                            "op": op,
                            "reason": "ONNX Runtime's quantizer left it in float",
                        }
                    )
        ctx.check_cancelled()

        # 3. Embedding tables: int8 rows, one scale per row, dequantized after the lookup.
        if "Gather" in wanted:
            done_rows, skipped_rows = gather_rows_int8(
                work, min_elements=config.min_elements, exclude=exclude)
            for item in done_rows:
                item["kernel"] = "int8 embedding rows (per-row scales, dequantized after Gather)"
            notes["quantized"].extend(done_rows)
            notes["skipped"].extend(skipped_rows)

        # 4. Weight-only int8 where ONNX Runtime has no dynamic kernel (GRU, leftover Gemm) and
        #    inside subgraphs, which its quantizer does not visit.
        leftovers = wanted - _ORT_DYNAMIC - {"Gather"}
        done_main, skipped_main = weight_only_int8(
            work,
            leftovers,
            min_elements=config.min_elements,
            exclude=exclude,
            main_graph=True,
            subgraphs=False,
            per_channel=True,  # weight-only: per-channel costs nothing at run time
            symmetric=config.weight_type == "int8",
        )
        for item in done_main:
            item["reason"] = (
                f"ONNX Runtime has no dynamic int8 kernel for {item['op']}: stored int8 (4x "
                "smaller), dequantized at each run and computed in float (can be a bit slower)"
            )
        notes["weight_only_int8"].extend(done_main)
        notes["skipped"].extend(skipped_main)
        if config.subgraph_weights == "int8_weight_only":
            done_sub, skipped_sub = weight_only_int8(
                work,
                wanted,
                min_elements=config.min_elements,
                exclude=exclude,
                main_graph=False,
                subgraphs=True,
                per_channel=True,
                symmetric=config.weight_type == "int8",
            )
            for item in done_sub:
                item["reason"] = "inside a control-flow subgraph (not visited by ONNX Runtime)"
            notes["weight_only_int8"].extend(done_sub)
            notes["skipped"].extend(skipped_sub)
        else:
            sub = [
                n.name
                for g, depth in iter_graphs(work.graph)
                if depth > 0
                for n in g.node
                if n.op_type in wanted
            ]
            if sub:
                notes["skipped"].extend(
                    {"node": n, "reason": "inside a subgraph; subgraph_weights=keep_float"}
                    for n in sub
                )

        debug_bytes = strip_debug_metadata(work)
        bytes_after = work.ByteSize()
        notes.update(
            {
                "op_types": sorted(wanted),
                "per_channel": per_channel,
                "weight_type": config.weight_type,
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
                "float_weight_bytes_left": float_weight_bytes(work),
                "debug_metadata_bytes_removed": debug_bytes,
            }
        )
        uses = tensor_uses(work)
        conv_bytes = sum(
            int(np.prod(t.dims)) * 4
            for t in work.graph.initializer
            if t.data_type == TensorProto.FLOAT
            and any(u.node.op_type == "Conv" for u in uses.get(t.name, []))
        )
        if "Conv" not in wanted and conv_bytes > 0.5 * notes["float_weight_bytes_left"] > 0:
            notes["hint"] = (
                f"{conv_bytes} bytes of Conv weights stay float: dynamic int8 convolutions are "
                "slow on CPU, use quantize_static (QDQ) for the convolutional part"
            )
        ctx.notes.update(notes)
        if not notes["quantized"] and not notes["weight_only_int8"]:
            present = sorted({n.op_type for n in all_nodes(model)})
            raise EngineError(
                "no_effect",
                "nothing to quantize dynamically: "
                + (
                    "; ".join(f"{s['node']}: {s['reason']}" for s in notes["skipped"][:5])
                    if notes["skipped"]
                    else f"the model has no {', '.join(sorted(wanted))} nodes with float "
                    f"weights (its ops: {', '.join(present[:15])})"
                ),
                {"skipped": notes["skipped"][:50]},
            )
        # Judge the quantization alone: dropped debug metadata does not count as compression.
        if bytes_after + debug_bytes > SMALLER_RATIO * bytes_before:
            raise EngineError(
                "no_effect",
                f"dynamic int8 barely changed the model ({bytes_before} -> {bytes_after} bytes): "
                + notes.get(
                    "hint",
                    "its large weights are not in MatMul/Gemm/LSTM/GRU/Attention layers",
                ),
                {"bytes_before": bytes_before, "bytes_after": bytes_after},
            )
        return work
