"""Description: a JSON-able account of a validated model, the one the API returns on upload.

Opsets, IR version, producer, inputs and outputs with dtypes and shapes, parameter count
(4-bit packed weights counted two per byte), node counts (model-local functions as their
expanded bodies), subgraph depth and control flow, the quantized formats already present
(``detect_quantization``), op types and tensor bytes by dtype. Also ``graph_inputs`` (a model's
real inputs) and ``dtype_name``, which the rest of the engine uses. The top of the package's
modules: it reads the model through ``walk`` and counts nodes with ``validate``.
"""

from __future__ import annotations

import math
from collections import Counter

import onnx
from onnx import TensorProto

from service.engine.decoder import decoder_spec
from service.engine.ingest.validate import expanded_node_count
from service.engine.ingest.walk import _all_tensors, _expected_nbytes, _np_dtype, iter_graphs

# Quantized-format markers (op type -> format name).
_QUANT_OPS: dict[str, str] = {
    "QuantizeLinear": "qdq",
    "DequantizeLinear": "qdq",
    "DynamicQuantizeLinear": "dynamic_quantize_linear",
    "MatMulNBits": "matmul_nbits",
    "GatherBlockQuantized": "matmul_nbits",
    "MatMulInteger": "integer_ops",
    "ConvInteger": "integer_ops",
    "DynamicQuantizeMatMul": "integer_ops",
    "DynamicQuantizeLSTM": "integer_ops",
    "MatMulIntegerToFloat": "integer_ops",
    "QAttention": "qlinear",
    "QGemm": "qlinear",
    "QOrderedMatMul": "qlinear",
}


_LOW_BIT_TYPES = {
    TensorProto.INT8: "int8_initializers",
    TensorProto.UINT8: "int8_initializers",
    TensorProto.INT4: "int4_initializers",
    TensorProto.UINT4: "int4_initializers",
}


# uint8/int8 tensors this small are lookup tables or flags, not quantized weights.
_MIN_QUANT_WEIGHT_ELEMENTS = 64


_CONTROL_FLOW = {"If", "Loop", "Scan"}


def dtype_name(elem_type: int) -> str:
    """``TensorProto`` element type as a NumPy-style name ("float32", "int64", ...)."""
    dtype = _np_dtype(elem_type)
    return TensorProto.DataType.Name(elem_type).lower() if dtype is None else str(dtype)


def _value_desc(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    shape: list[int | str | None] | None = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.HasField("dim_param") and d.dim_param:
                shape.append(d.dim_param)
            else:
                shape.append(None)
    kind = v.type.WhichOneof("value")
    return {
        "name": v.name,
        "dtype": dtype_name(tt.elem_type) if kind == "tensor_type" else kind,
        "shape": shape,
    }


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs of the main graph (initializers listed as inputs by old exporters excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def parameter_count(model: onnx.ModelProto) -> int:
    """Stored weight elements in every graph: float and low-bit integer tensors.

    int32/int64 tensors (shapes, indices) are not parameters. 4-bit weights packed two per
    uint8 byte (MatMulNBits ``B``) count two per byte.
    """
    nbits_packed = set()
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized") and len(node.input) > 1:
                bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
                if bits == 4:
                    nbits_packed.add(node.input[1 if node.op_type == "MatMulNBits" else 0])
    counted = {
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT4,
        TensorProto.UINT4,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E5M2,
    }
    total = 0
    for t, _ in _all_tensors(model):
        if t.data_type in counted:
            n = math.prod(t.dims) if t.dims else 1
            total += 2 * n if t.name in nbits_packed else n
    return total


def detect_quantization(model: onnx.ModelProto) -> list[str]:
    """Quantized formats present: qdq, qlinear, dynamic_quantize_linear, integer_ops,
    matmul_nbits, int8_initializers, int4_initializers (sorted, unique)."""
    found: set[str] = set()
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in _QUANT_OPS:
                found.add(_QUANT_OPS[node.op_type])
            elif node.op_type.startswith("QLinear"):
                found.add("qlinear")
        for t in g.initializer:
            fmt = _LOW_BIT_TYPES.get(t.data_type)
            if fmt and (math.prod(t.dims) if t.dims else 1) >= _MIN_QUANT_WEIGHT_ELEMENTS:
                found.add(fmt)
    return sorted(found)


def _decoder(model: onnx.ModelProto) -> dict | None:
    """A causal decoder's token-ids input and the inputs a token dataset may leave out (made
    from the ids: ``service.engine.decoder``); None for other models."""
    spec = decoder_spec(model)
    if spec is None:
        return None
    return {"input_ids": spec.input_ids, "recognised_by": spec.recognised_by,
            "vocab": spec.vocab, "inputs_from_ids": [n for n in (
                spec.attention_mask, spec.position_ids, *(p.input for p in spec.past)) if n]}


def describe(model: onnx.ModelProto) -> dict:
    """A JSON-able description of a (validated) model."""
    ops: Counter[str] = Counter()
    n_nodes = 0
    depth = 0
    control_flow = False
    for g, d in iter_graphs(model.graph):
        depth = max(depth, d)
        for node in g.node:
            n_nodes += 1
            key = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            )
            ops[key] += 1
            control_flow = control_flow or node.op_type in _CONTROL_FLOW
    quant = detect_quantization(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    weight_bytes: Counter[str] = Counter()
    for t, _ in _all_tensors(model):
        weight_bytes[dtype_name(t.data_type)] += _expected_nbytes(t) or 0
    return {
        "format": "onnx",
        "opset": opset,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": [_value_desc(v) for v in graph_inputs(model)],
        "outputs": [_value_desc(v) for v in model.graph.output],
        "parameter_count": parameter_count(model),
        "node_count": n_nodes,
        "expanded_node_count": expanded_node_count(model),
        "function_count": len(model.functions),
        "subgraph_depth": depth,
        "control_flow": control_flow,
        "external_data": False,
        "already_quantized": bool(quant),
        "quantization": quant,
        "op_types": dict(sorted(ops.items())),
        "tensor_bytes_by_dtype": dict(sorted(weight_bytes.items())),
        "decoder": _decoder(model),
    }
