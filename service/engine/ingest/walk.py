"""Walking a model: every graph and subgraph, every function body, every stored tensor.

``iter_graphs`` yields the main graph and each If/Loop/Scan body below it with its depth;
``_bodies`` adds model-local functions and the subgraphs inside them; ``_all_tensors`` and
``_all_sparse`` yield every stored tensor (initializers, Constant and other attribute values,
the values and indices of sparse tensors) wherever it sits; ``_expected_nbytes`` is how many
bytes a tensor's dims and dtype call for, ``_np_dtype`` the NumPy dtype of an element type.
External data, validation and description all read the model through these. A leaf of the
package: imports only onnx and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.engine.graph import iter_graphs


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _function_subgraphs(fn: onnx.FunctionProto) -> Iterator[tuple[onnx.GraphProto, int]]:
    """Every If/Loop/Scan body inside a function's nodes, with its depth (the body = 0)."""
    for node in fn.node:
        for attr in node.attribute:
            for g in _attr_graphs(attr):
                for sub, depth in iter_graphs(g):
                    yield sub, depth + 1


@dataclass
class _Body:
    """Nodes and stored tensors of one graph or function body."""

    initializers: list[TensorProto]
    sparse_initializers: list[onnx.SparseTensorProto]
    nodes: list[onnx.NodeProto]


def _bodies(model: onnx.ModelProto) -> Iterator[_Body]:
    """The main graph, every subgraph, every model-local function and the subgraphs in it."""
    for g, _ in iter_graphs(model.graph):
        yield _Body(list(g.initializer), list(g.sparse_initializer), list(g.node))
    for fn in model.functions:
        yield _Body([], [], list(fn.node))
        for g, _ in _function_subgraphs(fn):
            yield _Body(list(g.initializer), list(g.sparse_initializer), list(g.node))


# (single, repeated) attribute types and their fields, for dense and sparse tensors
_DENSE = (onnx.AttributeProto.TENSOR, "t", onnx.AttributeProto.TENSORS, "tensors")
_SPARSE = (onnx.AttributeProto.SPARSE_TENSOR, "sparse_tensor",
           onnx.AttributeProto.SPARSE_TENSORS, "sparse_tensors")


def _attribute_tensors(nodes: list[onnx.NodeProto], kind: tuple) -> Iterator[Any]:
    """The tensors of one ``kind`` (``_DENSE`` or ``_SPARSE``) held in ``nodes``' attributes."""
    one, one_field, many, many_field = kind
    for node in nodes:
        for attr in node.attribute:
            if attr.type == one:
                yield getattr(attr, one_field)
            elif attr.type == many:
                yield from getattr(attr, many_field)


def _all_sparse(model: onnx.ModelProto) -> Iterator[tuple[onnx.SparseTensorProto, str]]:
    """Every sparse tensor: sparse initializers and sparse Constant/attribute values."""
    for body in _bodies(model):
        for s in body.sparse_initializers:
            yield s, "sparse_initializer"
        for s in _attribute_tensors(body.nodes, _SPARSE):
            yield s, "attribute"


def _all_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every stored tensor: initializers and Constant/attribute tensors, in every graph and
    function body, and the values and indices of every sparse tensor."""
    for body in _bodies(model):
        for t in body.initializers:
            yield t, "initializer"
        for t in _attribute_tensors(body.nodes, _DENSE):
            yield t, "attribute"
    for s, where in _all_sparse(model):
        yield s.values, f"{where} values"
        yield s.indices, f"{where} indices"


def _expected_nbytes(t: TensorProto) -> int | None:
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    n = math.prod(t.dims)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1):
        return (n + 1) // 2
    dtype = _np_dtype(t.data_type)
    return None if dtype is None else n * dtype.itemsize


def _np_dtype(data_type: int) -> np.dtype | None:
    """The NumPy dtype of a ``TensorProto`` element type; None where NumPy has none."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
