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
- Tensors smaller than ``min_elements`` stay float (their scale would cost more than it saves),
  and a result that is not smaller than its input is refused (``no_effect``).

``ctx.notes`` lists every candidate node with what was done to it and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.normalise import strip_debug_metadata
from service.engine.passes.graph_optimize import iter_graphs
from service.engine.registry import Pass, PassConfig, PassContext, register

DynamicOp = Literal["MatMul", "Gemm", "LSTM", "GRU", "Attention", "Conv", "Gather"]
_DEFAULT_DYNAMIC_OPS: tuple[DynamicOp, ...] = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")

# A result must be at most this fraction of the input's bytes to count (as in the pipeline).
SMALLER_RATIO = 0.98

# Ops ONNX Runtime's dynamic quantizer turns into integer kernels.
_ORT_DYNAMIC = {"MatMul", "Attention", "LSTM", "Conv", "Gather"}

# Which inputs of an op are weights, and the output-channel axis of each for per-channel scales.
# MatMul/Gemm B is [K, N] (axis 1, or 0 when Gemm has transB); LSTM/GRU W and R are
# [directions, gates*hidden, in] (axis 1); Conv W is [M, C/g, k...] (axis 0); Gather's table is
# [rows, dim] (axis 0: one scale per row keeps rare embeddings accurate).
_WEIGHT_INPUTS: dict[str, dict[int, int]] = {
    "MatMul": {1: 1},
    "Gemm": {1: 1},
    "LSTM": {1: 1, 2: 1},
    "GRU": {1: 1, 2: 1},
    "RNN": {1: 1, 2: 1},
    "Conv": {1: 0},
    "ConvTranspose": {1: 1},
    "Attention": {1: 1},
    "Gather": {0: 0},
}


class QuantizeDynamicConfig(PassConfig):
    """Dynamic int8 quantization (int8 weights, activations quantized per call)."""

    op_types: list[DynamicOp] = Field(
        default_factory=lambda: list(_DEFAULT_DYNAMIC_OPS),
        description="Op types to quantize. Conv is excluded by default: dynamic int8 "
        "convolutions are several times slower than float on CPU; use quantize_static for CNNs.",
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
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="Node names to keep in float (sensitive layers)."
    )
    subgraph_weights: Literal["int8_weight_only", "keep_float"] = Field(
        "int8_weight_only",
        description="Weights inside If/Loop/Scan bodies: store as int8 + DequantizeLinear "
        "(smaller file, float compute) or keep them float.",
    )


# --------------------------------------------------------------------------- shared machinery


@dataclass
class _Use:
    graph: onnx.GraphProto
    node: onnx.NodeProto
    index: int
    depth: int


def _weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.GraphProto, TensorProto]]:
    """Every initializer by name, with the graph that owns it (subgraphs included)."""
    out: dict[str, tuple[onnx.GraphProto, TensorProto]] = {}
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            out[tensor.name] = (graph, tensor)
    return out


def _uses(model: onnx.ModelProto) -> dict[str, list[_Use]]:
    """Every node input by tensor name, with its graph and nesting depth (0 = main graph)."""
    out: dict[str, list[_Use]] = {}

    def visit(graph: onnx.GraphProto, depth: int) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    out.setdefault(name, []).append(_Use(graph, node, i, depth))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, depth + 1)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub, depth + 1)

    visit(model.graph, 0)
    return out


def weight_axis(node: onnx.NodeProto, index: int) -> int | None:
    """Output-channel axis of weight input ``index`` of ``node``, or None if not a weight."""
    axis = _WEIGHT_INPUTS.get(node.op_type, {}).get(index)
    if axis is not None and node.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if trans_b else 1
    return axis


def quantize_weight_int8(
    graph: onnx.GraphProto,
    tensor: TensorProto,
    axis: int | None,
    *,
    symmetric: bool = True,
) -> dict:
    """Replace float ``tensor`` in ``graph`` by int8 data + a ``DequantizeLinear`` of the same name.

    Consumers anywhere (subgraphs reading it from the outer scope included) keep their input
    name and now read the dequantized tensor. ``axis`` selects per-channel scales (None = one
    scale). Returns facts for the notes (shape, axis, max relative error).
    """
    w = numpy_helper.to_array(tensor).astype(np.float32)
    name = tensor.name
    if axis is not None and (w.ndim == 0 or axis >= w.ndim):
        axis = None
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    if symmetric:
        amax = np.max(np.abs(w), axis=reduce_axes, keepdims=True) if w.ndim else np.abs(w)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        zp = None
        deq = q.astype(np.float32) * scale
    else:
        lo = np.minimum(np.min(w, axis=reduce_axes, keepdims=True), 0.0)
        hi = np.maximum(np.max(w, axis=reduce_axes, keepdims=True), 0.0)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-128 - lo / scale), -128, 127).astype(np.int8)
        q = np.clip(np.rint(w / scale) + zp, -128, 127).astype(np.int8)
        deq = (q.astype(np.float32) - zp) * scale
    err = float(np.max(np.abs(deq - w)) / (np.max(np.abs(w)) or 1.0))
    scale_arr = scale.reshape(-1) if axis is not None else scale.reshape(())
    q_name, s_name = f"{name}__int8", f"{name}__scale"
    inputs = [q_name, s_name]
    new_inits = [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale_arr, s_name)]
    if zp is not None:
        z_name = f"{name}__zero_point"
        inputs.append(z_name)
        zp_arr = zp.reshape(-1) if axis is not None else zp.reshape(())
        new_inits.append(numpy_helper.from_array(zp_arr, z_name))
    dq = helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}__dequantize")
    if axis is not None:
        dq.attribute.append(helper.make_attribute("axis", axis))
    keep = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    graph.node.insert(0, dq)
    return {"tensor": name, "shape": list(w.shape), "axis": axis, "max_rel_error": round(err, 5)}


def ensure_opset(model: onnx.ModelProto, minimum: int = 13) -> onnx.ModelProto:
    """Upgrade the default-domain opset to ``minimum`` (per-channel DequantizeLinear needs 13)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= minimum:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, minimum)
    except Exception as exc:  # onnx raises several types here
        raise EngineError(
            "unsupported_model",
            f"the model uses opset {current} and could not be upgraded to {minimum}, which "
            f"int8 per-channel weights need: {str(exc).splitlines()[0][:200]}",
        ) from None


def gemm_to_matmul(model: onnx.ModelProto, names: set[str] | None = None) -> list[str]:
    """Rewrite main-graph ``Gemm`` nodes with a constant B (and transA=0) as MatMul (+ Add).

    alpha and transB are folded into the weight, beta into the bias. Returns the names of the
    rewritten nodes. ``names`` limits the rewrite to those nodes.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _uses(model)
    done: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and (names is None or node.name in names)
            and len(node.input) >= 2
            and node.input[1] in inits
            and attrs.get("transA", 0) == 0
            and len(uses.get(node.input[1], [])) == 1
            and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
        )
        if not ok:
            new_nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            b = b.T
        b = b * float(attrs.get("alpha", 1.0))
        b_name = f"{node.input[1]}__matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), b_name))
        has_bias = len(node.input) >= 3 and bool(node.input[2])
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        new_nodes.append(
            helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=node.name)
        )
        if has_bias:
            c = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            c = c * float(attrs.get("beta", 1.0))
            c_name = f"{node.input[2]}__bias"
            graph.initializer.append(numpy_helper.from_array(c, c_name))
            new_nodes.append(
                helper.make_node(
                    "Add", [mm_out, c_name], [node.output[0]], name=f"{node.name}__bias"
                )
            )
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop initializers nobody reads any more (the original Gemm weights).
    used = set(_uses(model))
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done


def weight_only_int8(
    model: onnx.ModelProto,
    op_types: set[str],
    *,
    min_elements: int,
    exclude: set[str],
    main_graph: bool,
    subgraphs: bool,
    per_channel: bool = True,
    symmetric: bool = True,
    skip_nodes: set[str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Store the float weights of ``op_types`` nodes as int8 + DequantizeLinear, in place.

    A weight is converted only when every node reading it is a target (same op types, not
    excluded), so no other op silently sees quantized values. Returns (done, skipped) notes.
    """
    owners = _weights(model)
    uses = _uses(model)
    skip_nodes = skip_nodes or set()
    done: list[dict] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for name, (graph, tensor) in list(owners.items()):
        readers = uses.get(name, [])
        weight_reads = [u for u in readers if weight_axis(u.node, u.index) is not None]
        if not weight_reads or name in seen:
            continue
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
            continue
        targets = [
            u
            for u in weight_reads
            if u.node.op_type in op_types
            and ((u.depth == 0 and main_graph) or (u.depth > 0 and subgraphs))
            and u.node.name not in skip_nodes
        ]
        if not targets:
            continue
        label = {
            "node": targets[0].node.name,
            "op": targets[0].node.op_type,
            "in_subgraph": targets[0].depth > 0,
            "tensor": name,
        }
        numel = int(np.prod(tensor.dims)) if tensor.dims else 1
        if any(u.node.name in exclude for u in targets):
            skipped.append({**label, "reason": "excluded by nodes_to_exclude"})
            continue
        if numel < min_elements:
            skipped.append({**label, "reason": f"{numel} elements < min_elements"})
            continue
        if len(targets) != len(readers):
            others = sorted({u.node.op_type for u in readers if u not in targets})
            skipped.append({**label, "reason": f"also read by {', '.join(others)} (kept float)"})
            continue
        axis = weight_axis(targets[0].node, targets[0].index) if per_channel else None
        facts = quantize_weight_int8(graph, tensor, axis, symmetric=symmetric)
        done.append({**label, **facts})
        seen.add(name)
    return done, skipped


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
        for index in _WEIGHT_INPUTS.get(node.op_type, {}):
            if index < len(node.input) and node.input[index] in inits:
                t = inits[node.input[index]]
                if t.data_type == TensorProto.FLOAT:
                    weight = node.input[index]
                    numel = max(numel, int(np.prod(t.dims)) if t.dims else 1)
        out.append((node, weight, numel))
    return out


def int8_sqnr_db(w: np.ndarray, axis: int | None) -> float:
    """SQNR (dB) of symmetric int8 round-to-nearest with one scale (axis None) or per channel."""
    w = w.astype(np.float32)
    if axis is None or w.ndim == 0 or axis >= w.ndim:
        amax = np.max(np.abs(w))
    else:
        amax = np.max(np.abs(w), axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    err = w - np.clip(np.rint(w / scale), -127, 127) * scale
    signal, noise = float(np.sum(w * w)), float(np.sum(err * err))
    return 200.0 if noise == 0 else 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def choose_per_channel(
    model: onnx.ModelProto, nodes: list[tuple[str, str, str]]
) -> tuple[bool, list[dict]]:
    """Per-channel only where it helps: True when some weight's per-tensor int8 SQNR is both
    low (< 35 dB) and more than 6 dB under its per-channel SQNR. Returns (choice, evidence)."""
    inits = {t.name: t for t in model.graph.initializer}
    node_by_name = {n.name: n for n in model.graph.node}
    evidence = []
    for node_name, _op, weight in nodes:
        node = node_by_name.get(node_name)
        if node is None or weight not in inits:
            continue
        index = list(node.input).index(weight)
        w = numpy_helper.to_array(inits[weight])
        per_tensor = int8_sqnr_db(w, None)
        per_chan = int8_sqnr_db(w, weight_axis(node, index))
        if per_tensor < 35.0 and per_chan - per_tensor > 6.0:
            evidence.append(
                {
                    "node": node_name,
                    "per_tensor_db": round(per_tensor, 1),
                    "per_channel_db": round(per_chan, 1),
                }
            )
    return bool(evidence), evidence


def float_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float32/float64 initializers over all graphs."""
    total = 0
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
                total += int(np.prod(t.dims) if t.dims else 1) * (
                    4 if t.data_type == TensorProto.FLOAT else 8
                )
    return total


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
        "ONNX Runtime's integer kernels, GRU and subgraph weights are stored int8 (weight-only)."
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
        exclude = set(config.nodes_to_exclude)
        notes: dict = {"quantized": [], "weight_only_int8": [], "skipped": []}

        # 1. Gemm -> MatMul (+Add) so Gemm gets the dynamic int8 MatMul kernel.
        if "Gemm" in wanted:
            gemms = {
                n.name
                for n, w, numel in _candidates(work, {"Gemm"})
                if w and numel >= config.min_elements and n.name not in exclude
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
            if node.name in exclude:
                notes["skipped"].append({**label, "reason": "excluded by nodes_to_exclude"})
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

        # 3. Weight-only int8 where ONNX Runtime has no dynamic kernel (GRU, leftover Gemm) and
        #    inside subgraphs, which its quantizer does not visit.
        leftovers = wanted - _ORT_DYNAMIC
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
                for g in list(iter_graphs(work.graph))[1:]
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
        conv_bytes = sum(
            int(np.prod(t.dims)) * 4
            for t in work.graph.initializer
            if t.data_type == TensorProto.FLOAT
            and any(u.node.op_type == "Conv" for u in _uses(work).get(t.name, []))
        )
        if "Conv" not in wanted and conv_bytes > 0.5 * notes["float_weight_bytes_left"] > 0:
            notes["hint"] = (
                f"{conv_bytes} bytes of Conv weights stay float: dynamic int8 convolutions are "
                "slow on CPU, use quantize_static (QDQ) for the convolutional part"
            )
        ctx.notes.update(notes)
        if not notes["quantized"] and not notes["weight_only_int8"]:
            present = sorted({n.op_type for g in iter_graphs(model.graph) for n in g.node})
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
