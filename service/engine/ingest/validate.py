"""Validation: refuse a model that is malformed, hostile or unloadable on the worker.

``validate`` runs our own checks first, for precise messages and for what the checker misses:
IR version, subgraph nesting, opsets against ``MAX_OPSET``, the node count with model-local
functions expanded (``expanded_node_count``: no recursion, bounded call depth), known op domains,
unique SSA names in topological order (an out-of-order acyclic graph is sorted in place), every
tensor's bytes against its dims and dtype, NaN and infinite weights, sparse tensors, declared
shapes within the limits; then the ONNX checker and strict shape inference, then the same bounds
on every inferred shape. Also the two fix-ups ingest makes to a model: ``unknown_dynamic_dims``
(dims declared -1 or 0 become dynamic) and ``fit_ir_version`` (an IR version too new for the
runtime lowered to what the opsets need). Depends on ``walk``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from service.engine.errors import EngineError
from service.engine.external import checkable
from service.engine.ingest.walk import (
    _all_sparse,
    _all_tensors,
    _attr_graphs,
    _expected_nbytes,
    _function_subgraphs,
    _np_dtype,
    iter_graphs,
)
from service.engine.limits import EngineLimits

# Highest opset per domain that the worker's ONNX Runtime (1.20+) loads; a test keeps these
# honest against the installed onnxruntime. Known domains only: an op in any other domain has no
# kernel on the worker and is refused up front instead of failing later in a pass.
MAX_OPSET: dict[str, int] = {"": 26, "ai.onnx.ml": 5, "com.microsoft": 1}
_DOMAIN_ALIASES = {"ai.onnx": ""}

# Newest IR version the worker's ONNX Runtime loads (tests/unit/engine/test_ingest.py checks it
# against the installed onnxruntime).
RUNTIME_MAX_IR_VERSION = 13

# Element types that exist since IR 4-8; newer IR versions only add types (float8, int4, ...).
_CLASSIC_TYPES = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.UINT8,
        TensorProto.INT8,
        TensorProto.UINT16,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.STRING,
        TensorProto.BOOL,
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
        TensorProto.UINT32,
        TensorProto.UINT64,
        TensorProto.COMPLEX64,
        TensorProto.COMPLEX128,
        TensorProto.BFLOAT16,
    }
)

# (op type, input index) where an initializer is a learned weight (Inf there is a broken export;
# -Inf elsewhere is legitimately used as an attention mask).
_WEIGHT_SLOTS = {
    ("Conv", 1),
    ("ConvTranspose", 1),
    ("MatMul", 1),
    ("MatMul", 0),
    ("Gemm", 1),
    ("Gemm", 0),
    ("LSTM", 1),
    ("LSTM", 2),
    ("GRU", 1),
    ("GRU", 2),
    ("RNN", 1),
    ("RNN", 2),
}


def fit_ir_version(model: onnx.ModelProto) -> str | None:
    """Lower an IR version the runtime cannot load to the one the model actually needs.

    Exporters built on a newer ``onnx`` stamp its newest IR version on every model, even when
    the opsets and types in it need a far older one (opset 17 needs IR 8): ONNX Runtime then
    refuses a perfectly ordinary model. When the opsets and every element type fit an IR the
    runtime loads, the number is lowered in place; returns a note saying so, else None.
    """
    if model.ir_version <= RUNTIME_MAX_IR_VERSION:
        return None
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except (ValueError, KeyError):
        return None
    if needed > RUNTIME_MAX_IR_VERSION:
        return None
    for graph, _ in iter_graphs(model.graph):
        types = [t.data_type for t in graph.initializer]
        types += [
            v.type.tensor_type.elem_type
            for v in (*graph.input, *graph.output, *graph.value_info)
            if v.type.HasField("tensor_type")
        ]
        if any(t and t not in _CLASSIC_TYPES for t in types):
            return None
    old = model.ir_version
    model.ir_version = max(needed, 7)
    return f"IR version lowered from {old} to {model.ir_version} (what its opsets need) so ONNX Runtime loads it"


def validate(model: onnx.ModelProto, limits: EngineLimits | None = None) -> None:
    """Refuse models that are malformed, hostile or unloadable on the worker.

    Own checks first (they give precise messages and catch what the checker misses), then the
    ONNX checker and strict shape inference, then bounds on every inferred tensor size.
    """
    limits = limits or EngineLimits()
    if model.ir_version > onnx.IR_VERSION:
        raise EngineError(
            "unsupported_model",
            f"IR version {model.ir_version} is newer than "
            f"this service supports ({onnx.IR_VERSION})",
        )
    depth = _max_depth(model.graph, 0, limits.max_subgraph_depth)
    if depth > limits.max_subgraph_depth:
        raise _too_deep_subgraphs(limits)
    _check_opsets(model)
    graphs = list(iter_graphs(model.graph))
    n_nodes = expanded_node_count(model, limits)
    if n_nodes > limits.max_nodes:
        raise EngineError(
            "model_too_large",
            "the graph has too many nodes (model-local functions counted as their bodies)",
            {"nodes": n_nodes, "limit": limits.max_nodes},
        )
    if not model.graph.node or not model.graph.output:
        raise EngineError("invalid_model", "the graph is empty (no nodes or no outputs)")
    _check_domains(model, graphs)
    _check_names_and_order(model.graph, set())
    _check_tensors(model, limits)
    _check_sparse(model, limits)
    _check_declared_shapes(model, limits)
    try:
        onnx.checker.check_model(checkable(model), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise EngineError(
            "invalid_model", "the ONNX checker refused the model: " + _clean_message(str(exc))
        ) from None
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        raise EngineError(
            "invalid_model", "shape inference failed: " + _clean_message(str(exc))
        ) from None
    _check_declared_shapes(inferred, limits)


def _clean_message(msg: str) -> str:
    """Checker messages can embed the whole node and paths: keep the first lines, no paths."""
    msg = re.sub(r"(/[\w.\-]+)+", "<path>", msg)
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return " ".join(lines[:3])[:500]


def _max_depth(graph: onnx.GraphProto, depth: int, limit: int) -> int:
    """Deepest nesting, stopping as soon as ``limit`` is passed (protects the recursion)."""
    deepest = depth
    if depth > limit:
        return depth
    for node in graph.node:
        for attr in node.attribute:
            for g in _attr_graphs(attr):
                deepest = max(deepest, _max_depth(g, depth + 1, limit))
                if deepest > limit:
                    return deepest
    return deepest


def _too_deep_subgraphs(limits: EngineLimits) -> EngineError:
    return EngineError(
        "unsupported_model",
        "subgraphs (If/Loop/Scan) are nested too deeply",
        {"limit": limits.max_subgraph_depth},
    )


def _check_opsets(model: onnx.ModelProto | onnx.FunctionProto, what: str = "") -> None:
    seen = set()
    for op in model.opset_import:
        domain = _DOMAIN_ALIASES.get(op.domain, op.domain)
        if domain in seen:
            raise EngineError(
                "invalid_model", f"{what or 'the model'}: opset for domain {op.domain!r} imported twice"
            )
        seen.add(domain)
        if domain in MAX_OPSET and op.version > MAX_OPSET[domain]:
            raise EngineError(
                "unsupported_model",
                f"opset {op.version} of domain "
                f"{op.domain or 'ai.onnx'!r} is newer than the runtime supports "
                f"(max {MAX_OPSET[domain]}); export with a lower opset",
                {"domain": op.domain, "opset": op.version, "max": MAX_OPSET[domain]},
            )
        if domain in MAX_OPSET and op.version < 1:
            raise EngineError("invalid_model", f"invalid opset {op.version}")
    if "" not in seen and isinstance(model, onnx.ModelProto):
        raise EngineError("invalid_model", "the model imports no ai.onnx opset")


def _function_key(domain: str, name: str, overload: str = "") -> tuple[str, str, str]:
    return (_DOMAIN_ALIASES.get(domain, domain), name, overload)


def _node_calls(node: onnx.NodeProto) -> tuple[str, str, str]:
    return _function_key(node.domain, node.op_type, node.overload)


def _walk_nodes(
    nodes: Iterable[onnx.NodeProto], limits: EngineLimits, depth: int = 0
) -> Iterator[onnx.NodeProto]:
    """Every node of a body and of the If/Loop/Scan bodies inside it (depth bounded)."""
    if depth > limits.max_subgraph_depth:
        raise _too_deep_subgraphs(limits)
    for node in nodes:
        yield node
        for attr in node.attribute:
            for g in _attr_graphs(attr):
                yield from _walk_nodes(g.node, limits, depth + 1)


def expanded_node_count(model: onnx.ModelProto, limits: EngineLimits | None = None) -> int:
    """Nodes of the model once every model-local function call is replaced by its body.

    Counted with multiplicities without expanding anything (each function's size is computed
    once), so a chain of functions each calling the next twice is measured in linear time.
    A function that calls itself, directly or through others, is refused (``invalid_model``);
    so is a call chain deeper than ``max_function_depth`` (``unsupported_model``) and any
    function whose body alone expands past ``max_nodes`` (``model_too_large``).
    """
    limits = limits or EngineLimits()
    functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for fn in model.functions:
        key = _function_key(fn.domain, fn.name, fn.overload)
        if key in functions:
            raise EngineError(
                "invalid_model", f"function {fn.domain}::{fn.name} is defined twice"
            )
        functions[key] = fn
    sizes: dict[tuple[str, str, str], tuple[int, int]] = {}  # key -> (expanded nodes, depth)
    active: list[tuple[str, str, str]] = []

    def measure(nodes: Iterable[onnx.NodeProto]) -> tuple[int, int]:
        total, deepest = 0, 0
        for node in _walk_nodes(nodes, limits):
            total += 1
            key = _node_calls(node)
            if key in functions:
                size, depth = function_size(key)
                total += size
                deepest = max(deepest, depth)
            if total > limits.max_nodes:
                break  # already too many: the caller refuses, no need to count on
        return total, deepest

    def too_deep() -> EngineError:
        return EngineError(
            "unsupported_model",
            "model-local functions call each other too deeply",
            {"limit": limits.max_function_depth},
        )

    def function_size(key: tuple[str, str, str]) -> tuple[int, int]:
        if key in sizes:
            return sizes[key]
        if key in active:
            cycle = [f"{d}::{n}" for d, n, _ in active[active.index(key):]] + [f"{key[0]}::{key[1]}"]
            raise EngineError(
                "invalid_model",
                "model-local functions call themselves (recursion): " + " -> ".join(cycle[:10]),
                {"cycle": cycle[:50]},
            )
        if len(active) >= limits.max_function_depth:
            raise too_deep()
        active.append(key)
        size, depth = measure(functions[key].node)
        active.pop()
        if depth + 1 > limits.max_function_depth:  # a chain measured from its bottom up
            raise too_deep()
        if size > limits.max_nodes:
            raise EngineError(
                "model_too_large",
                f"function {key[0]}::{key[1]} expands to more nodes than this server accepts",
                {"function": f"{key[0]}::{key[1]}", "limit": limits.max_nodes},
            )
        sizes[key] = (size, depth + 1)
        return sizes[key]

    for key in functions:  # unused functions too: a malformed one is refused all the same
        function_size(key)
    total = 0
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            total += 1 + (sizes[_node_calls(node)][0] if _node_calls(node) in sizes else 0)
    return total


def _check_domains(model: onnx.ModelProto, graphs: list[tuple[onnx.GraphProto, int]]) -> None:
    """Every op, in the graphs and in function bodies, is of a known domain or a local function."""
    functions = {_function_key(f.domain, f.name, f.overload) for f in model.functions}
    unknown: Counter[str] = Counter()
    nodes: list[onnx.NodeProto] = [n for g, _ in graphs for n in g.node]
    for fn in model.functions:
        _check_opsets(fn, what=f"function {fn.domain}::{fn.name}")
        nodes += [n for n in fn.node]
        nodes += [n for g, _ in _function_subgraphs(fn) for n in g.node]
    for node in nodes:
        domain = _DOMAIN_ALIASES.get(node.domain, node.domain)
        if domain in MAX_OPSET or _node_calls(node) in functions:
            continue
        unknown[f"{node.domain}::{node.op_type}"] += 1
    if unknown:
        raise EngineError(
            "unsupported_model",
            "the model uses operators from domains the "
            "runtime does not know (custom ops): " + ", ".join(sorted(unknown)[:10]),
            {"operators": sorted(unknown)[:50]},
        )


def _check_names_and_order(graph: onnx.GraphProto, outer: set[str]) -> None:
    """SSA names, no duplicates, no cycles: every input defined before its use.

    A graph whose nodes are out of order but acyclic is sorted in place (some exporters do
    that); a cycle is refused.
    """
    defined: set[str] = set()
    for v in graph.input:
        if v.name in defined:
            raise EngineError("invalid_model", f"duplicate graph input name {v.name!r}")
        defined.add(v.name)
    init_names = set()
    for t in graph.initializer:
        if t.name in init_names:
            raise EngineError("invalid_model", f"duplicate initializer name {t.name!r}")
        init_names.add(t.name)
    for t in graph.sparse_initializer:
        init_names.add(t.values.name)
    defined |= init_names
    produced: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if not o:
                continue
            if o in produced or o in defined:
                raise EngineError(
                    "invalid_model", f"tensor name {o!r} is produced twice (names must be unique)"
                )
            produced[o] = i
    available = defined | outer
    # Kahn's algorithm on node dependencies (outer-scope names used by subgraphs count too).
    deps: list[set[int]] = []
    for node in graph.node:
        needed = set(node.input) | _subgraph_free_names(node)
        d = set()
        for name in needed:
            if not name or name in available and name not in produced:
                continue
            if name in produced:
                d.add(produced[name])
            elif name not in available:
                raise EngineError(
                    "invalid_model",
                    f"node {node.name or node.op_type!r} reads {name!r}, which nothing defines",
                )
        deps.append(d)
    order: list[int] = []
    remaining = {i: set(d) for i, d in enumerate(deps)}
    users: dict[int, list[int]] = {}
    for i, d in remaining.items():
        for j in d:
            users.setdefault(j, []).append(i)
    ready = deque(i for i, d in remaining.items() if not d)
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users.get(i, []):
            remaining[u].discard(i)
            if not remaining[u]:
                ready.append(u)
    if len(order) != len(graph.node):
        raise EngineError("invalid_model", "the graph has a cycle")
    if order != sorted(order):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes, strict=True):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)
    scope = available | set(produced)
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _check_names_and_order(sub, scope)


def _subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    free: set[str] = set()
    for attr in node.attribute:
        for g in _attr_graphs(attr):
            local = {v.name for v in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local |= set(n.output)
            for n in g.node:
                free |= {i for i in n.input if i and i not in local}
                free |= {i for i in _subgraph_free_names(n) if i not in local}
            free |= {o.name for o in g.output if o.name not in local}
    return free


def _check_tensors(model: onnx.ModelProto, limits: EngineLimits) -> None:
    weight_inits: set[str] = set()
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            for idx, name in enumerate(node.input):
                if (node.op_type, idx) in _WEIGHT_SLOTS:
                    weight_inits.add(name)
    total = 0
    for t, where in _all_tensors(model):
        n = math.prod(t.dims) if t.dims else 1
        if any(d < 0 for d in t.dims):
            raise EngineError("invalid_model", f"tensor {t.name!r} has a negative dimension")
        if n > limits.max_tensor_elements:
            raise EngineError(
                "model_too_large",
                f"tensor {t.name!r} has {n} elements",
                {"limit": limits.max_tensor_elements},
            )
        expected = _expected_nbytes(t)
        if t.HasField("raw_data") and expected is not None and len(t.raw_data) != expected:
            raise EngineError(
                "invalid_model",
                f"tensor {t.name!r} declares {expected} bytes "
                f"(dims x dtype) but holds {len(t.raw_data)}",
            )
        if not t.HasField("raw_data") and t.data_location != TensorProto.EXTERNAL:
            held = _typed_field_len(t)
            if (
                held is not None
                and held not in (0, n)
                and not (
                    t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) and held == 2 * n
                )
                and not (
                    t.data_type in (TensorProto.INT4, TensorProto.UINT4) and held == (n + 1) // 2
                )
            ):
                raise EngineError(
                    "invalid_model", f"tensor {t.name!r} declares {n} elements but holds {held}"
                )
            if held == 0 and n > 0 and t.data_type != TensorProto.STRING:
                raise EngineError(
                    "invalid_model", f"tensor {t.name!r} declares {n} elements but holds no data"
                )
        total += expected or 0
        if (
            t.data_type
            in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
            and n
        ):
            found = _nonfinite(t, inf=t.name in weight_inits and where == "initializer")
            if found is not None:
                if found == "nan":
                    raise EngineError(
                        "invalid_model",
                        f"tensor {t.name!r} contains NaN values; the exported weights are broken",
                    )
                if found == "inf":
                    raise EngineError(
                        "invalid_model",
                        f"weight {t.name!r} contains infinite "
                        "values; the exported weights are broken",
                    )
    if total > limits.max_model_bytes:
        raise EngineError(
            "model_too_large",
            "the model's tensors exceed the size limit",
            {"bytes": total, "limit": limits.max_model_bytes},
        )


def _check_sparse(model: onnx.ModelProto, limits: EngineLimits) -> None:
    """Sparse tensors obey the dense rules for their dense shape (the runtime densifies sparse
    initializers when it loads them): dims and element count bounded, values 1-D, indices
    ``[NNZ]`` (linear) or ``[NNZ, rank]`` int64 inside the dense shape. Their values and
    indices are also checked as ordinary tensors (``_check_tensors``: bytes, NaN)."""
    dense_bytes = 0
    for sp, _ in _all_sparse(model):
        name = sp.values.name or "<unnamed>"
        if any(d < 0 for d in sp.dims):
            raise EngineError("invalid_model", f"sparse tensor {name!r} has a negative dimension")
        big = next((d for d in sp.dims if d > limits.max_dim), None)
        if big is not None:
            raise EngineError(
                "model_too_large",
                f"sparse tensor {name!r} declares a dimension of {big}",
                {"limit": limits.max_dim},
            )
        n = math.prod(sp.dims) if sp.dims else 1
        if n > limits.max_tensor_elements:
            raise EngineError(
                "model_too_large",
                f"sparse tensor {name!r} has {n} elements once dense",
                {"limit": limits.max_tensor_elements},
            )
        dense_bytes += n * _itemsize(sp.values.data_type)
        if len(sp.values.dims) != 1:
            raise EngineError("invalid_model", f"sparse tensor {name!r}: values must be 1-D")
        nnz = sp.values.dims[0]
        idx = sp.indices
        if nnz > n:
            raise EngineError(
                "invalid_model", f"sparse tensor {name!r} holds more values than elements"
            )
        if idx.data_type != TensorProto.INT64 or list(idx.dims) not in ([nnz], [nnz, len(sp.dims)]):
            raise EngineError(
                "invalid_model",
                f"sparse tensor {name!r}: indices must be int64 of shape [NNZ] or [NNZ, rank]",
            )
        arr = _to_array(idx) if nnz else None
        if nnz and arr is None:
            raise EngineError("invalid_model", f"sparse tensor {name!r}: unreadable indices")
        if arr is not None:
            bounds = np.array([n]) if arr.ndim == 1 else np.array(list(sp.dims))
            if (arr < 0).any() or (arr >= bounds).any():
                raise EngineError(
                    "invalid_model", f"sparse tensor {name!r} has indices outside its shape"
                )
    if dense_bytes > limits.max_model_bytes:
        raise EngineError(
            "model_too_large",
            "the model's sparse tensors exceed the size limit once dense",
            {"bytes": dense_bytes, "limit": limits.max_model_bytes},
        )


def _itemsize(data_type: int) -> int:
    """Bytes per element (at least 1: 4-bit types are rounded up, strings unknown -> 1)."""
    dtype = _np_dtype(data_type)
    return 1 if dtype is None else max(1, dtype.itemsize)


def _typed_field_len(t: TensorProto) -> int | None:
    for f in (
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
    ):
        vals = getattr(t, f)
        if len(vals):
            return len(vals)
    return 0


SCAN_CHUNK_BYTES = 16 << 20


def _nonfinite(t: TensorProto, *, inf: bool) -> str | None:
    """"nan" when float tensor ``t`` holds a NaN, else "inf" when ``inf`` and it holds an
    infinity, else None (also when its values cannot be decoded: the checker reports that). A
    few million values at a time; a tensor kept in external data is read through one buffer of
    ``SCAN_CHUNK_BYTES``, never mapped: its pages stay the page cache's, not the job's
    resident set."""
    nan = False
    for chunk in _chunks(t):
        if np.isnan(chunk).any():
            return "nan"
        nan = nan or (inf and bool(np.isinf(chunk).any()))
    return "inf" if nan else None


def _chunks(t: TensorProto) -> Any:
    if t.data_location != TensorProto.EXTERNAL:
        arr = _to_array(t)
        if arr is None:
            return
        flat = arr.reshape(-1)
        step = max(1, SCAN_CHUNK_BYTES // max(flat.itemsize, 1))
        for i in range(0, flat.size, step):
            yield flat[i:i + step]
        return
    from service.engine.external import external_source

    try:
        path, offset, length = external_source(t)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        return
    buffer = np.empty(max(1, SCAN_CHUNK_BYTES // dtype.itemsize) * dtype.itemsize, np.uint8)
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length - length % dtype.itemsize
        while left > 0:
            got = fh.readinto(memoryview(buffer.data)[:min(left, buffer.size)])
            if not got:
                return
            got -= got % dtype.itemsize
            yield buffer[:got].view(dtype)
            left -= got


def _to_array(t: TensorProto) -> np.ndarray | None:
    try:
        if t.data_location == TensorProto.EXTERNAL:  # kept on disk by ingest: mapped, not read
            from service.engine.external import read_tensor

            return read_tensor(t)
        return onnx.numpy_helper.to_array(t)
    except Exception:  # malformed typed fields; the checker reports them precisely
        return None


def unknown_dynamic_dims(graph: onnx.GraphProto) -> int:
    """Make dims declared -1 or 0 (how PaddlePaddle writes dynamic dims) unknown dims, which
    is what ONNX Runtime takes them for and what shape inference understands; returns how
    many. The other values of the graph (inputs, outputs, value_info) keep their shapes."""
    count = 0
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0 and d.dim_value >= -1:
                d.ClearField("dim_value")
                count += 1
    return count


def _check_declared_shapes(model: onnx.ModelProto, limits: EngineLimits) -> None:
    for g, _ in iter_graphs(model.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
            if tt is None or not tt.HasField("shape"):
                continue
            n = 1
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    # -1 and 0 are how some exporters (PaddlePaddle) write a dynamic dim.
                    if d.dim_value < -1:
                        raise EngineError(
                            "invalid_model",
                            f"{v.name!r} declares the dimension {d.dim_value} (only -1 or 0 "
                            "may stand for a dynamic dimension)",
                        )
                    if d.dim_value <= 0:
                        continue
                    if d.dim_value > limits.max_dim:
                        raise EngineError(
                            "model_too_large",
                            f"{v.name!r} declares a dimension of {d.dim_value}",
                            {"limit": limits.max_dim},
                        )
                    n *= d.dim_value
            if n > limits.max_tensor_elements:
                raise EngineError(
                    "model_too_large",
                    f"{v.name!r} would hold {n} elements",
                    {"limit": limits.max_tensor_elements},
                )
