"""Small read/write access to ONNX graphs shared by the training bridge and the pruning passes.

Only onnx and numpy: the pass modules that import this stay light for the API process.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

# The ops whose second input is a weight matrix/kernel that compression passes rewrite.
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers of the main graph by name."""
    return {t.name: t for t in model.graph.initializer}


def get_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer ``name`` as a numpy array."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def set_array(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace initializer ``name`` in place (same name, new value and dims)."""
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Map tensor name -> nodes of the main graph that read it."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """An attribute's value, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A readable name for a node (its name, or op type and position when unnamed)."""
    return node.name or f"{node.op_type}#{index}"


def weight_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight initializer name) for Conv/Gemm/MatMul nodes whose weight is an initializer.

    Ordered as in the graph (topological order), so the first and last layers are at the ends.
    Weights shared by several nodes are listed once (at their first use).
    """
    inits = initializers(model)
    seen: set[str] = set()
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        tensor = inits.get(name)
        if tensor is None or name in seen:
            continue
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if len(tensor.dims) < 2:
            continue
        seen.add(name)
        out.append((node, name))
    return out


def value_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shapes known after ONNX shape inference (symbolic dims as strings, unknown as None)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int | str | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = dims
    return out


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the Conv/Gemm/MatMul nodes for one sample (batch dims = 1).

    Uses shape inference; a node whose output shape is not known counts 0 (so the figure is a
    lower bound on models with unresolved dynamic shapes).
    """
    shapes = value_shapes(model)
    inits = initializers(model)
    total = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        out_shape: list[Any] | None = shapes.get(node.output[0])
        w = inits.get(node.input[1])
        w_shape: list[Any] | None = list(w.dims) if w is not None else shapes.get(node.input[1])
        if not out_shape or not w_shape or any(not isinstance(d, int) for d in w_shape):
            continue
        out_elems = int(np.prod([d if isinstance(d, int) else 1 for d in out_shape]))
        if node.op_type == "Conv":
            group = int(attr(node, "group", 1))
            per_output = int(np.prod(w_shape[1:]))  # (C_in / group) * kernel
            del group  # the kernel shape already holds C_in / group
            total += out_elems * per_output
        elif node.op_type == "Gemm":
            trans_b = int(attr(node, "transB", 0))
            k = w_shape[1] if trans_b else w_shape[0]
            total += out_elems * int(k)
        else:  # MatMul with an initializer weight [..., K, N]
            total += out_elems * int(w_shape[-2])
    return total


def serialized_sizes(model: onnx.ModelProto, level: int = 3) -> dict[str, int]:
    """Bytes of the serialized model, raw and zstd-compressed (what a zstd artifact weighs)."""
    import zstandard

    raw = model.SerializeToString()
    return {
        "bytes": len(raw),
        "bytes_zstd": len(zstandard.ZstdCompressor(level=level).compress(raw)),
    }

