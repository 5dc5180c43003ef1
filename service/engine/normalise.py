"""Normalise an ingested model before any technique runs on it.

Real exports hold weights in ``Constant`` nodes, use old opsets, hide weights inside If/Loop/Scan
bodies and list initializers as graph inputs. Passes (ONNX Runtime's quantizers above all) only
see weights that are initializers, and per-channel QDQ needs opset >= 13. ``normalise`` fixes
that without changing what the model computes:

1. initializers listed as main-graph inputs (old ``keep_initializers_as_inputs`` exports) become
   plain constants; dims declared ``-1``/``0`` (PaddlePaddle's dynamic dims) become unknown dims;
2. ``Constant`` nodes become initializers of the graph they live in (subgraphs included);
3. opsets older than ``min_opset`` are upgraded with ``onnx.version_converter``;
4. constant folding of simple ops whose inputs are all constants (size-bounded, never across
   control flow, never Q/DQ), removal of ``Identity`` and dead nodes and unused initializers;
5. nodes get unique names (passes restrict themselves by node name).

Dynamic dimensions are never touched (nothing depending on a graph input is folded), and If/Loop/
Scan bodies stay subgraphs. ``iter_initializers`` lets passes reach every weight, subgraph
weights included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.external import checkable
from service.engine.graph import iter_graphs
from service.engine.ingest import _subgraph_free_names, unknown_dynamic_dims
from service.engine.limits import EngineLimits

__all__ = ["iter_graphs", "iter_initializers", "normalise", "MIN_OPSET"]

MIN_OPSET = 13

# Ops folded when every input is a constant. Control flow, randomness, Q/DQ (the structure of a
# quantized model) and anything with a subgraph are never folded.
_FOLDABLE = {
    "Identity",
    "Transpose",
    "Reshape",
    "Cast",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Concat",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Exp",
    "Abs",
    "Gather",
    "Slice",
    "Shape",
    "Size",
    "Range",
    "ConstantOfShape",
    "Expand",
    "Tile",
    "Equal",
    "Where",
    "Not",
    "Less",
    "Greater",
    "Min",
    "Max",
    "ReduceProd",
    "ReduceSum",
}
# Ops whose output never holds more elements than their (first) input.
_SIZE_PRESERVING = {
    "Identity",
    "Transpose",
    "Reshape",
    "Cast",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Abs",
    "Shape",
    "Size",
    "Not",
    "Gather",
    "Slice",
    "ReduceProd",
    "ReduceSum",
}
# Folding may grow a tensor (Expand, Tile, ConstantOfShape, broadcasting) only this far: beyond
# it the folded model would be bigger on disk than the graph that computes the tensor.
_GROWTH_ALLOWANCE = 4096


def iter_initializers(
    model: onnx.ModelProto,
) -> Iterator[tuple[onnx.GraphProto, TensorProto]]:
    """Yield ``(graph, initializer)`` for the main graph and every subgraph (If/Loop/Scan).

    Passes use it to reach weights inside control flow; mutate the tensor in place or edit
    ``graph.initializer`` of the yielded graph.
    """
    for graph, _ in iter_graphs(model.graph):
        for tensor in list(graph.initializer):
            yield graph, tensor


def normalise(
    model: onnx.ModelProto, limits: EngineLimits | None = None, *, min_opset: int = MIN_OPSET
) -> tuple[onnx.ModelProto, list[str]]:
    """Return a normalised copy of ``model`` and the list of what was done (for the report).

    Raises ``EngineError('unsupported_model')`` when the opset cannot be upgraded, naming why.
    """
    limits = limits or EngineLimits()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []

    n = _drop_initializer_inputs(out.graph)
    if n:
        notes.append(f"{n} initializers listed as graph inputs made constant")
    n = sum(unknown_dynamic_dims(g) for g, _ in iter_graphs(out.graph))
    if n:
        notes.append(f"{n} dims declared as -1 or 0 made dynamic (unknown) dims")
    n = sum(_constants_to_initializers(g) for g, _ in iter_graphs(out.graph))
    if n:
        notes.append(f"{n} Constant nodes folded into initializers")
    out = _upgrade_opset(out, min_opset, notes)
    _raise_ir_for_subgraph_initializers(out)

    folded = _fold_constants(out, limits)
    if folded:
        notes.append(f"{folded} constant subexpressions folded")
    removed = sum(_remove_identities(g, out.graph) for g, _ in iter_graphs(out.graph))
    if removed:
        notes.append(f"{removed} Identity nodes removed")
    dead, unused = _prune(out.graph)
    if dead:
        notes.append(f"{dead} unused nodes removed")
    if unused:
        notes.append(f"{unused} unused initializers removed")
    stripped = strip_debug_metadata(out)
    if stripped:
        notes.append(f"{stripped} bytes of per-node debug info (exporter stack traces, doc "
                     "strings) dropped")
    renamed = _unique_node_names(out)
    if renamed:
        notes.append(f"{renamed} nodes named or renamed to make node names unique")
    try:
        onnx.checker.check_model(checkable(out))
    except onnx.checker.ValidationError as exc:  # a bug here, not the user's fault
        raise EngineError(
            "unsupported_model",
            "the model could not be normalised: " + str(exc).strip().splitlines()[0][:300],
        ) from None
    return out, notes


# ---------------------------------------------------------------------------------------------


def _drop_initializer_inputs(graph: onnx.GraphProto) -> int:
    inits = {t.name for t in graph.initializer}
    keep = [v for v in graph.input if v.name not in inits]
    dropped = len(graph.input) - len(keep)
    if dropped:
        copies = [onnx.ValueInfoProto() for _ in keep]
        for c, v in zip(copies, keep, strict=True):
            c.CopyFrom(v)
        del graph.input[:]
        graph.input.extend(copies)
    return dropped


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a tensor, or None for sparse/string forms."""
    for attr in node.attribute:
        if attr.name == "value":
            t = TensorProto()
            t.CopyFrom(attr.t)
            return t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), np.int64))
    return None


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    keep: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            t = _constant_tensor(node)
            if t is not None:
                t.name = node.output[0]
                new_inits.append(t)
                continue
        keep.append(node)
    if new_inits:
        _replace_nodes(graph, keep)
        graph.initializer.extend(new_inits)
    return len(new_inits)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _upgrade_opset(model: onnx.ModelProto, min_opset: int, notes: list[str]) -> onnx.ModelProto:
    current = _default_opset(model)
    if current >= min_opset:
        return model
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, min_opset)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError with the op name
        reason = _converter_reason(exc)
        raise EngineError(
            "unsupported_model",
            f"the model uses opset {current}; upgrading it to opset {min_opset} (needed by the "
            f"compression passes) failed: {reason}. Re-export with opset >= {min_opset}.",
            {"opset": current, "required": min_opset},
        ) from None
    upgraded.ir_version = max(upgraded.ir_version, 7)
    notes.append(f"opset upgraded from {current} to {min_opset}")
    return upgraded


def _converter_reason(exc: Exception) -> str:
    """The converter's assertion text without its C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "failed:" in text:
        text = text.split("failed:", 1)[1].strip()
    text = re.sub(r"(/[\w.\-]+)+(:\d+)?:?", "", text).strip()
    return text[:300] or type(exc).__name__


def _raise_ir_for_subgraph_initializers(model: onnx.ModelProto) -> None:
    # Initializers that are not graph inputs need IR >= 4.
    model.ir_version = max(model.ir_version, 4)


# ---------------------------------------------------------------------------------------------
# Constant folding


def _fold_constants(model: onnx.ModelProto, limits: EngineLimits) -> int:
    from onnx.reference import ReferenceEvaluator

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is only a size hint here; fold nothing that could grow
        inferred = model
    shapes: dict[str, int | None] = {}
    for g, _ in iter_graphs(inferred.graph):
        for v in list(g.value_info) + list(g.output):
            dims = v.type.tensor_type.shape.dim if v.type.HasField("tensor_type") else []
            if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                shapes[v.name] = math.prod(d.dim_value for d in dims)
            else:
                shapes[v.name] = None

    opsets = list(model.opset_import)
    folded = 0
    for graph, _ in iter_graphs(model.graph):
        consts = {t.name: t for t in graph.initializer}
        graph_outputs = {o.name for o in graph.output}
        keep: list[onnx.NodeProto] = []
        changed = False
        for node in graph.node:
            if (
                node.op_type in _FOLDABLE
                and node.domain in ("", "ai.onnx")
                and node.input
                and all(i in consts for i in node.input if i)
                # weights kept in external data stay there (folding would read them whole)
                and not any(consts[i].data_location == TensorProto.EXTERNAL
                            for i in node.input if i)
                and len(node.output) == 1
                and node.output[0] not in graph_outputs
            ):
                in_elems = sum(math.prod(consts[i].dims) for i in node.input if i)
                known = shapes.get(node.output[0])
                if node.op_type in _SIZE_PRESERVING:
                    bound_ok = True
                else:
                    bound_ok = known is not None and known <= max(in_elems, _GROWTH_ALLOWANCE)
                if bound_ok:
                    value = _evaluate(ReferenceEvaluator, node, consts, opsets)
                    if (
                        value is not None
                        and value.size <= limits.max_tensor_elements
                        and (
                            node.op_type in _SIZE_PRESERVING
                            or value.size <= max(in_elems, _GROWTH_ALLOWANCE)
                        )
                    ):
                        try:
                            t = numpy_helper.from_array(value, node.output[0])
                        except Exception:  # dtype numpy_helper cannot write: keep the node
                            t = None
                        if t is not None:
                            graph.initializer.append(t)
                            consts[t.name] = t
                            folded += 1
                            changed = True
                            continue
            keep.append(node)
        if changed:
            _replace_nodes(graph, keep)
    return folded


def _evaluate(evaluator_cls, node, consts, opsets) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    inputs = [i for i in node.input if i]
    feeds = {i: numpy_helper.to_array(consts[i]) for i in inputs}
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(i, consts[i].data_type, list(consts[i].dims))
            for i in inputs
        ],
        [helper.make_empty_tensor_value_info(node.output[0])],
    )
    model = helper.make_model(graph, opset_imports=opsets)
    try:
        (value,) = evaluator_cls(model).run(None, feeds)
    except Exception:  # an op the reference runtime cannot evaluate: keep the node
        return None
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------
# Identity and dead-code removal


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, old, new)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_uses(g, old, new)
    for o in graph.output:
        if o.name == old:
            o.name = new


def _remove_identities(graph: onnx.GraphProto, main: onnx.GraphProto) -> int:
    outputs = {o.name for o in graph.output}
    keep = []
    removed = 0
    for node in graph.node:
        if (
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and node.output[0] not in outputs
            and node.input[0]
        ):
            # Uses of the output may sit in this graph or in its subgraphs (not in outer ones).
            _rename_uses(graph, node.output[0], node.input[0])
            removed += 1
            continue
        keep.append(node)
    if removed:
        _replace_nodes(graph, keep)
    return removed


def _prune(graph: onnx.GraphProto) -> tuple[int, int]:
    """Remove nodes whose outputs nobody reads and unused initializers, in every graph."""
    used = {o.name for o in graph.output}
    keep_rev = []
    dead = 0
    for node in reversed(graph.node):
        if any(o in used for o in node.output if o):
            keep_rev.append(node)
            used.update(i for i in node.input if i)
            used.update(_subgraph_free_names(node))
        else:
            dead += 1
    if dead:
        _replace_nodes(graph, list(reversed(keep_rev)))
    inits = [t for t in graph.initializer if t.name in used]
    unused = len(graph.initializer) - len(inits)
    if unused:
        copies = []
        for t in inits:
            c = TensorProto()
            c.CopyFrom(t)
            copies.append(c)
        del graph.initializer[:]
        graph.initializer.extend(copies)
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                d, u = _prune(sub)
                dead += d
                unused += u
    return dead, unused


def _unique_node_names(model: onnx.ModelProto) -> int:
    seen: set[str] = set()
    changed = 0
    counter = 0
    for graph, _ in iter_graphs(model.graph):
        for node in graph.node:
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            base = node.name or f"{node.op_type}"
            name = base
            while name in seen:
                counter += 1
                name = f"{base}_{counter}"
            if not node.name:
                counter += 1
                name = f"{base}_{counter}"
                while name in seen:
                    counter += 1
                    name = f"{base}_{counter}"
            node.name = name
            seen.add(name)
            changed += 1
    return changed


def strip_debug_metadata(model: onnx.ModelProto) -> int:
    """Drop per-node metadata and doc strings (in place); returns the bytes saved.

    The dynamo exporter attaches a Python stack trace (with file paths of the machine that
    exported the model) to every node: several percent of a small model, and nothing a
    runtime reads. Model-level metadata (producer, metadata_props) is kept.
    """
    before = model.ByteSize()
    for graph, _ in iter_graphs(model.graph):
        # ClearField, not = "": protobuf2 would store an explicitly empty string.
        for node in graph.node:
            del node.metadata_props[:]
            node.ClearField("doc_string")
        graph.ClearField("doc_string")
        for value in (*graph.value_info, *graph.input, *graph.output):
            del value.metadata_props[:]
            value.ClearField("doc_string")
    return before - model.ByteSize()
