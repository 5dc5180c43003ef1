"""int8 weight helpers shared by the quantization passes: which inputs are weights (and their
channel axis), int8 + DequantizeLinear storage of a weight, weight-only int8 over a model, and
the SQNR test that decides per-channel scales.

Only onnx and numpy. (Which int8 *encoding* a job's target needs is ``int8_encoding``.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph import initializers_with_graph, tensor_uses
from service.engine.scope import EXCLUDED

# Which inputs of an op are weights, and the output-channel axis of each for per-channel scales.
# MatMul/Gemm B is [K, N] (axis 1, or 0 when Gemm has transB); LSTM/GRU W and R are
# [directions, gates*hidden, in] (axis 1); Conv W is [M, C/g, k...] (axis 0); Gather's table is
# [rows, dim] (axis 0: one scale per row keeps rare embeddings accurate).
WEIGHT_INPUTS: dict[str, dict[int, int]] = {
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


def weight_axis(node: onnx.NodeProto, index: int) -> int | None:
    """Output-channel axis of weight input ``index`` of ``node``, or None if not a weight."""
    axis = WEIGHT_INPUTS.get(node.op_type, {}).get(index)
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
    excluded), so no other op silently sees quantized values. ``exclude``: node names kept
    float (noted as excluded); ``skip_nodes``: nodes not considered at all. Returns (done,
    skipped) notes.
    """
    owners = initializers_with_graph(model)
    uses = tensor_uses(model)
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
            skipped.append({**label, "reason": EXCLUDED})
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


def gather_rows_int8(
    model: onnx.ModelProto, *, min_elements: int, exclude: set[str]
) -> tuple[list[dict], list[dict]]:
    """Embedding tables of the main graph stored int8 with one scale per row, dequantized
    after the lookup, in place.

    A float initializer read only as the data of ``Gather`` (axis 0) nodes becomes an int8
    table ``[rows, ...]`` and a scale ``[rows, 1, ...]``; each Gather then reads the int8 rows
    and their scales with the same indices, and ``Cast`` + ``Mul`` give the float rows. Only
    the rows looked up are dequantized, at every run (unlike a ``DequantizeLinear`` in front
    of the Gather, which dequantizes the whole table). ONNX Runtime's dynamic quantizer has a
    Gather path too, with one scale per tensor; rare tokens' rows are far smaller than the
    table's largest value, so one scale per row keeps them accurate. Returns (done, skipped);
    each done item names its new Gather nodes (``lookups``: int8 rows and scales stay as they
    are, no later pass should quantize them again).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = tensor_uses(model)
    done: list[dict] = []
    skipped: list[dict] = []
    for name, tensor in list(inits.items()):
        readers = uses.get(name, [])
        gathers = [u for u in readers if u.node.op_type == "Gather" and u.index == 0
                   and u.depth == 0]
        if not gathers or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 1:
            continue
        label = {"node": gathers[0].node.name, "op": "Gather", "tensor": name}
        numel = int(np.prod(tensor.dims))
        axes = {next((a.i for a in u.node.attribute if a.name == "axis"), 0) for u in gathers}
        if any(u.node.name in exclude for u in gathers):
            skipped.append({**label, "reason": EXCLUDED})
        elif numel < min_elements:
            skipped.append({**label, "reason": f"{numel} elements < min_elements"})
        elif len(gathers) != len(readers):
            others = sorted({u.node.op_type for u in readers if u not in gathers})
            skipped.append({**label, "reason": f"also read by {', '.join(others)} (kept float)"})
        elif axes != {0}:
            skipped.append({**label, "reason": "Gather along an axis other than 0"})
        else:
            w = numpy_helper.to_array(tensor).astype(np.float32)
            amax = np.max(np.abs(w.reshape(w.shape[0], -1)), axis=1)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            scale = scale.reshape((w.shape[0],) + (1,) * (w.ndim - 1))
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            err = float(np.max(np.abs(q * scale - w)) / (np.max(np.abs(w)) or 1.0))
            q_name, s_name = f"{name}__int8_rows", f"{name}__row_scale"
            graph.initializer.remove(tensor)
            graph.initializer.extend([numpy_helper.from_array(q, q_name),
                                      numpy_helper.from_array(scale, s_name)])
            lookups: list[str] = []
            for use in gathers:
                node, ids, out = use.node, use.node.input[1], use.node.output[0]
                position = list(graph.node).index(node)
                stem = node.name or out
                new = [
                    helper.make_node("Gather", [q_name, ids], [f"{out}__int8"],
                                     name=f"{stem}__int8", axis=0),
                    helper.make_node("Gather", [s_name, ids], [f"{out}__scale"],
                                     name=f"{stem}__scale", axis=0),
                    helper.make_node("Cast", [f"{out}__int8"], [f"{out}__float"],
                                     name=f"{stem}__cast", to=TensorProto.FLOAT),
                    helper.make_node("Mul", [f"{out}__float", f"{out}__scale"], [out],
                                     name=f"{stem}__dequantize"),
                ]
                lookups += [new[0].name, new[1].name]
                graph.node.remove(node)
                for offset, item in enumerate(new):
                    graph.node.insert(position + offset, item)
            done.append({**label, "shape": list(w.shape), "axis": 0, "scales": "per row",
                         "readers": len(gathers), "lookups": lookups,
                         "max_rel_error": round(err, 5)})
    return done, skipped
