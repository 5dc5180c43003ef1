"""A model run a segment at a time: its weights resident one slice at a time, not all at once.

A model whose weights stay in external data files can be larger than the memory a job may hold.
ONNX Runtime reads a whole model's weights while it runs, so a session of it keeps them all
resident (mapped pages of the files, counted in the process's RSS), however the mapping is
shared. ``SegmentedSession`` runs the saved model instead as consecutive segments of its main
graph, in graph order, each holding at most ``budget`` bytes of weights (a single larger weight
is a segment of its own): a segment's session is made, runs every feed it is given, and is
dropped, with the mapping of its weights, before the next one is made; the values that cross a
cut (a transformer's residual stream, its masks and position tables) are kept in memory between
them. Outputs are those of the whole model (the same kernels run on the same values; ONNX
Runtime's optimizer sees one segment at a time, so a fusion across a cut is not made).

Used for the float original of a job under a memory limit when its weights pass a share of it
(``segment_budget``): fidelity and the language-model metrics compare against it segment by
segment; its latency is the sum of its segments' (``evaluate.compare_latency``). What is
written here, not taken from a library: ONNX Runtime and onnx have no graph-segmenting runner.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.engine.limits import EngineLimits

Feed = dict[str, np.ndarray]

WHOLE_SHARE = 0.5  # a model whose external weights pass this share of the job's limit: segments
SEGMENT_SHARE = 0.2  # of the limit, the weights one segment may map

# ONNX Runtime's type strings (``NodeArg.type``) by numpy dtype name
_ORT_TYPE = {"float32": "float", "float64": "double", "float16": "float16", "int8": "int8",
             "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
             "uint32": "uint32", "int64": "int64", "uint64": "uint64", "bool": "bool"}


def segment_budget(path: Path, limits: EngineLimits) -> int | None:
    """The weight bytes one segment of the saved model at ``path`` may hold, or None when the
    model runs whole: ``limits.segment_weight_bytes`` when set and the model's external weights
    pass it; else, under a job memory limit (``devices.host.memory_limit``), ``SEGMENT_SHARE`` of
    that limit when the external weights pass ``WHOLE_SHARE`` of it."""
    from service.engine.devices.host import memory_limit
    from service.engine.external import external_weight_bytes

    weights = external_weight_bytes(Path(path))
    if not weights:
        return None
    if limits.segment_weight_bytes is not None:
        return limits.segment_weight_bytes if weights > limits.segment_weight_bytes else None
    space = memory_limit()
    if space is None or weights <= WHOLE_SHARE * space[0]:
        return None
    return max(1, int(SEGMENT_SHARE * space[0]))


@dataclass(frozen=True)
class Segment:
    """Consecutive main-graph nodes (``nodes``: their indices), the values they take from
    before (graph inputs or earlier segments' outputs), the values later ones or the graph's
    outputs need from them, the initializers they read and those initializers' bytes."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...]
    weight_bytes: int


def _tensor_bytes(t: TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data) or int(np.prod([int(d) for d in t.dims], dtype=np.int64)) * 4


def _references(node: onnx.NodeProto) -> list[str]:
    """The names ``node`` reads: its inputs and what its subgraphs read from outside them."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            names.extend(_outer_references(g))
    return names


def _outer_references(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: list[str] = []
    for node in graph.node:
        used.extend(n for n in _references(node) if n not in defined)
        defined.update(o for o in node.output if o)
    return used


def plan_segments(graph: onnx.GraphProto, budget: int) -> list[Segment]:
    """``graph``'s nodes cut, in order, into segments of at most ``budget`` initializer bytes
    each (a node whose own weights pass it is a segment of its own)."""
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    groups: list[list[int]] = []
    current: list[int] = []
    held: set[str] = set()
    total = 0
    refs = [_references(n) for n in graph.node]
    for index, names in enumerate(refs):
        new = {n for n in names if n in sizes} - held
        add = sum(sizes[n] for n in new)
        if current and add and total and total + add > budget:
            groups.append(current)
            current, held, total = [], set(), 0
            new = {n for n in names if n in sizes}
            add = sum(sizes[n] for n in new)
        current.append(index)
        held |= new
        total += add
    if current:
        groups.append(current)

    graph_outputs = [o.name for o in graph.output]
    needed_after: list[set[str]] = [set() for _ in groups]  # read by a later segment
    later: set[str] = set(graph_outputs)
    for g in range(len(groups) - 1, -1, -1):
        needed_after[g] = set(later)
        for index in groups[g]:
            later.update(refs[index])
    segments = []
    for g, group in enumerate(groups):
        produced: set[str] = set()
        inputs: list[str] = []
        weights: list[str] = []
        for index in group:
            for name in refs[index]:
                if name in sizes:
                    if name not in weights:
                        weights.append(name)
                elif name not in produced and name not in inputs:
                    inputs.append(name)
            produced.update(o for o in graph.node[index].output if o)
        outputs = [o for index in group for o in graph.node[index].output
                   if o and o in needed_after[g]]
        segments.append(Segment(tuple(group), tuple(inputs), tuple(dict.fromkeys(outputs)),
                                tuple(weights), sum(sizes[w] for w in weights)))
    return segments


@dataclass(frozen=True)
class _Arg:
    """What ``SegmentedSession.get_inputs``/``get_outputs`` return (ONNX Runtime's NodeArg
    fields the engine reads)."""

    name: str
    type: str
    shape: tuple


def _arg(value: onnx.ValueInfoProto) -> _Arg:
    tt = value.type.tensor_type
    try:
        kind = _ORT_TYPE.get(np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, "")
    except (KeyError, TypeError, ValueError):
        kind = ""
    shape = tuple((d.dim_value if d.HasField("dim_value") else d.dim_param or None)
                  for d in tt.shape.dim) if tt.HasField("shape") else ()
    return _Arg(value.name, f"tensor({kind})" if kind else "", shape)


class SegmentedSession:
    """The saved model at ``path`` run segment by segment (module docstring), with ONNX
    Runtime's CPU provider at ``threads`` intra-op threads. Duck-types the parts of an
    ``InferenceSession`` the engine uses (``get_inputs``, ``get_outputs``, ``run``); ``run_many``
    runs many feeds with each segment loaded once."""

    def __init__(self, path: Path, budget: int, threads: int,
                 config: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.threads = threads
        self.config = dict(config or {})
        self.model = onnx.load(str(self.path), load_external_data=False)
        graph = self.model.graph
        self.segments = plan_segments(graph, budget)
        self.budget = budget
        inits = {t.name for t in graph.initializer}
        self._inputs = [_arg(v) for v in graph.input if v.name not in inits]
        self._outputs = [_arg(v) for v in graph.output]
        self._types = _value_types(self.model)
        self.peak_weight_bytes = max((s.weight_bytes for s in self.segments), default=0)
        self.weight_bytes = sum(_tensor_bytes(t) for t in graph.initializer
                                if t.data_location == TensorProto.EXTERNAL)

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def run(self, names: Sequence[str] | None, feed: Feed, *_: Any) -> list[np.ndarray]:
        wanted = list(names) if names else [o.name for o in self._outputs]
        out = self.run_many([feed], wanted)[0]
        return [out[n] for n in wanted]

    def run_many(self, feeds: Sequence[Feed], names: Sequence[str] | None = None) -> list[Feed]:
        """The outputs ``names`` (default: all) for every feed, each segment loaded once."""
        wanted = list(names) if names else [o.name for o in self._outputs]
        states = [dict(f) for f in feeds]
        keep = set(wanted)
        for k in range(len(self.segments)):
            session = self.session(k)
            seg = self.segments[k]
            for state in states:
                outs = session.run(list(seg.outputs), {n: state[n] for n in seg.inputs})
                state.update(zip(seg.outputs, outs, strict=True))
            del session
            later = keep | {n for s in self.segments[k + 1:] for n in s.inputs}
            for state in states:
                for name in [n for n in state if n not in later]:
                    del state[name]
        return [{n: np.asarray(s[n]) for n in wanted} for s in states]

    def segment_feeds(self, feed: Feed) -> list[Feed]:
        """Each segment's own inputs for ``feed`` (one pass through the model)."""
        state = dict(feed)
        out: list[Feed] = []
        for k, seg in enumerate(self.segments):
            out.append({n: state[n] for n in seg.inputs})
            session = self.session(k)
            state.update(zip(seg.outputs, session.run(list(seg.outputs), out[-1]), strict=True))
            del session
        return out

    def views(self, k: int) -> list[tuple[str, object]]:
        """Read-only mappings of segment ``k``'s external weights (``external.tensor_views``),
        for sessions of it to share."""
        from service.engine.external import tensor_views

        return tensor_views(self.path, set(self.segments[k].weights))

    def session(self, k: int, threads: int | None = None,
                views: list[tuple[str, object]] | None = None) -> Any:
        """A fresh ONNX Runtime session of segment ``k``; its weights are read from ``views``
        (default: a mapping of its own), let go with the session."""
        import onnxruntime as ort

        from service.engine.external import NO_PREPACKING, float_weights_on_disk

        seg = self.segments[k]
        model = self._segment_model(seg)
        file = self.path.parent / f".segment-{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx"
        opts = ort.SessionOptions()
        if float_weights_on_disk(self.path):
            opts.add_session_config_entry(*NO_PREPACKING)
        for key, value in self.config.items():
            opts.add_session_config_entry(key, value)
        if views is None:
            views = self.views(k)
        for name, ortvalue in views:
            opts.add_initializer(name, ortvalue)
        opts.intra_op_num_threads = threads or self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            onnx.save_model(model, str(file))
            session = ort.InferenceSession(str(file), sess_options=opts,
                                           providers=["CPUExecutionProvider"])
        finally:
            file.unlink(missing_ok=True)
        session._edgepress_shared = views
        return session

    def _segment_model(self, seg: Segment) -> onnx.ModelProto:
        graph = self.model.graph
        inits = {t.name: t for t in graph.initializer}
        inputs = [self._value_info(n) for n in seg.inputs]
        outputs = [self._value_info(n) for n in seg.outputs]
        sub = helper.make_graph([graph.node[i] for i in seg.nodes], f"{graph.name}_segment",
                                inputs, outputs, [inits[w] for w in seg.weights])
        model = helper.make_model(sub, opset_imports=list(self.model.opset_import),
                                  ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        elem = self._types.get(name)
        if elem is None:
            return onnx.ValueInfoProto(name=name)
        return helper.make_tensor_value_info(name, elem, None)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph value onnx's shape inference can tell (and of the
    graph's inputs, outputs and initializers)."""
    from service.engine.external import checkable

    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(checkable(model))
        values = (list(inferred.graph.value_info) + list(inferred.graph.input)
                  + list(inferred.graph.output))
    except Exception:  # what inference cannot tell, ONNX Runtime infers at load
        values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    for v in values:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def resident_note(session: SegmentedSession) -> str:
    """Why a model was run in segments, for a report."""
    return (f"the original's weights ({session.weight_bytes / 2**20:,.0f} MB) pass the share "
            f"of the job's memory it may hold at once: it was run in {len(session.segments)} "
            f"segments of at most {session.budget / 2**20:,.0f} MB of weights, one resident at "
            "a time")

