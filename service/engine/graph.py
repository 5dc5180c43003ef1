"""ONNX graph helpers shared by the passes: walking subgraphs, finding weights and their readers,
opsets, topological order, op counts and the Gemm -> MatMul rewrite.

Only onnx and numpy: the pass modules that import this stay light for the API process.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError


def iter_graphs(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.GraphProto, int]]:
    """Yield ``(graph, depth)`` for a graph and every subgraph below it (If/Loop/Scan bodies),
    depth first; the main graph has depth 0."""
    yield graph, depth
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub, depth + 1)


def all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the main graph and of its subgraphs."""
    for graph, _ in iter_graphs(model.graph):
        yield from graph.node


def default_opset(model: onnx.ModelProto, missing: int = 0) -> int:
    """The model's default-domain (``ai.onnx``) opset version, ``missing`` when it has none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def ensure_opset(model: onnx.ModelProto, minimum: int = 13) -> onnx.ModelProto:
    """Upgrade the default-domain opset to ``minimum`` (per-channel DequantizeLinear needs 13)."""
    current = default_opset(model)
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


# --------------------------------------------------------------------------- weights and uses


@dataclass
class Use:
    """One node input reading a tensor: the graph and node, the input index, nesting depth."""

    graph: onnx.GraphProto
    node: onnx.NodeProto
    index: int
    depth: int


def initializers_with_graph(
    model: onnx.ModelProto,
) -> dict[str, tuple[onnx.GraphProto, TensorProto]]:
    """Every initializer by name, with the graph that owns it (subgraphs included)."""
    out: dict[str, tuple[onnx.GraphProto, TensorProto]] = {}
    for graph, _ in iter_graphs(model.graph):
        for tensor in graph.initializer:
            out[tensor.name] = (graph, tensor)
    return out


def tensor_uses(model: onnx.ModelProto) -> dict[str, list[Use]]:
    """Every node input by tensor name, with its graph and nesting depth (0 = main graph)."""
    out: dict[str, list[Use]] = {}

    def visit(graph: onnx.GraphProto, depth: int) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    out.setdefault(name, []).append(Use(graph, node, i, depth))
            for attr in node.attribute:  # a body's reads come right after its node's
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, depth + 1)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub, depth + 1)

    visit(model.graph, 0)
    return out


def float_weights(model: onnx.ModelProto, *, double: bool = True) -> tuple[int, int]:
    """(count, bytes) of float32 initializers over all graphs, float64 too unless ``double``
    is False."""
    sizes = {TensorProto.FLOAT: 4, **({TensorProto.DOUBLE: 8} if double else {})}
    count = total = 0
    for graph, _ in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_type in sizes:
                count += 1
                total += int(np.prod(t.dims) if t.dims else 1) * sizes[t.data_type]
    return count, total


def float_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float32/float64 initializers over all graphs."""
    return float_weights(model)[1]


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count over the main graph and all subgraphs (domain-qualified if not ONNX)."""
    counts: Counter[str] = Counter()
    for node in all_nodes(model):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] += 1
    return dict(counts)


# --------------------------------------------------------------------------- rewrites


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` (which may be nodes of ``graph`` itself) the node list of ``graph``."""
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _nested_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read by ``node`` or by nodes of its subgraphs (outer-scope reads)."""
    names = set(node.input)
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for inner in sub.node:
                names |= _nested_inputs(inner)
    return names


def toposort(model: onnx.ModelProto) -> int:
    """Sort the nodes of every graph topologically, in place (stable). Returns nodes moved.

    Some converters append nodes (I/O casts) after their consumers: ONNX Runtime tolerates it,
    the ONNX checker and other runtimes do not.
    """
    moved = 0
    for graph, _ in iter_graphs(model.graph):
        producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        needs = [
            {
                producer[name]
                for name in _nested_inputs(n)
                if name in producer and producer[name] != i
            }
            for i, n in enumerate(graph.node)
        ]
        # Kahn's algorithm, always taking the ready node that came first (stable order).
        users: dict[int, list[int]] = {}
        indegree = [len(d) for d in needs]
        for i, deps in enumerate(needs):
            for d in deps:
                users.setdefault(d, []).append(i)
        ready = [i for i, k in enumerate(indegree) if k == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for u in users.get(i, []):
                indegree[u] -= 1
                if indegree[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(graph.node):  # a cycle: leave it, the checker will say so
            continue
        if order != list(range(len(graph.node))):
            moved += sum(1 for a, b in zip(order, range(len(order)), strict=True) if a != b)
            replace_nodes(graph, [graph.node[i] for i in order])
    return moved


def gemm_to_matmul(model: onnx.ModelProto, names: set[str] | None = None) -> list[str]:
    """Rewrite main-graph ``Gemm`` nodes with a constant B (and transA=0) as MatMul (+ Add).

    alpha and transB are folded into the weight, beta into the bias. Returns the names of the
    rewritten nodes. ``names`` limits the rewrite to those nodes.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = tensor_uses(model)
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
    used = set(tensor_uses(model))
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done
