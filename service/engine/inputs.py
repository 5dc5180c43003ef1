"""The inputs a model is run on when no dataset gives them: shapes and values, resolved.

A job may say what its model takes (``inputs`` in the request, ``JobInputs``)::

    {"image": {"shape": [1, 3, 640, 640]}, "sr": {"value": 16000}}

A ``shape`` replaces the input's dynamic dims (its static dims must agree); a ``value`` fills
the input with one number (a sample rate, a flag) instead of generated values.

``resolve_inputs`` builds the ``InputPlan`` that evaluation (and calibration without data)
generates from. Given shapes and values come first, then the model's static dims. Dynamic dims
(symbolic, unknown, or declared ``-1``/``0`` as PaddlePaddle does) are probed: trials are built
from what the graph shows and the original model is run in ONNX Runtime on each until one runs
and gives finite outputs.

- Roles of dynamic dims: axis 0 of a tensor of rank >= 2 and the batch axis of a recurrent
  state (``initial_h``/``initial_c`` of LSTM/GRU/RNN) are batch axes: 1. The spatial axes of an
  image-like input (4-D float; NCHW or NHWC from where a 1-4 channel axis sits) try
  ``IMAGE_SIDES`` (common sizes, multiples of 32 and 64). 1-D/2-D float inputs and the last axis
  of a 3-D float input with few channels are signals: ``SIGNAL_LENGTHS`` (window lengths). Axes
  of integer or boolean tensors and of masks are sequences: ``SEQUENCE_LENGTHS``. Other dynamic
  dims try ``OTHER_DIMS``. One symbol is one variable (the same value everywhere it appears);
  within a trial every dim of a role gets the same value.
- Values: floats are standard normal; integers used (through casts and reshapes) as ``Gather``
  indices into a constant table draw from its rows; inputs named like masks are ones; scalar
  integers try the constants the graph compares them against, then 1 and 0; booleans are
  random; other integers are 0 or 1.

A causal decoder (``service.engine.decoder.decoder_spec``: token ids in, logits out, a KV cache) is
not probed: ``decoder_plan`` gives a prefill of ``DECODER_PROMPT`` token ids from the vocabulary
(or the job's ``input_ids`` shape), an attention mask of ones, position ids 0..L-1 and past
tensors of length 0, and ``resolve_inputs`` checks that it runs and that a decode step (past of
length L, the prefill's ``present`` tensors) runs too.

Trials are ordered so that the first candidate of every role comes first and later ones are
mixed in by rank; probing stops at ``PROBE_TRIALS`` trials or ``PROBE_SECONDS``. The plan's
``record`` (``report["eval_inputs"]["resolution"]``) says, per input, the shape, how its values
are made and why; a model that runs on no trial is refused once, with what failed on which
shapes and what the user can give instead.

This module imports numpy, onnx and pydantic only (the API validates ``JobInputs``); ONNX
Runtime sessions are handed in.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.engine.decoder import DecoderSpec, decode_feed, decoder_spec
from service.engine.errors import EngineError
from service.engine.graph import iter_graphs

Feed = dict[str, np.ndarray]

MAX_INPUTS = 64
MAX_INPUT_RANK = 16
MAX_INPUT_DIM = 1 << 20
MAX_INPUT_ELEMENTS = 1 << 26  # per input: 256 MB of float32

IMAGE_SIDES = (224, 320, 256, 384, 416, 512, 640, 160, 128, 96, 64, 32)
SIGNAL_LENGTHS = (16000, 8000, 4096, 2048, 1024, 512, 256, 22050, 44100)
SEQUENCE_LENGTHS = (128, 16, 64, 32, 256, 512)
OTHER_DIMS = (16, 1, 32, 64)
DEFAULT_BATCH = 1
DEFAULT_DYNAMIC_DIM = 16  # what an unprobed plan gives a non-batch dynamic dim
PROBE_TRIALS = 40
PROBE_SECONDS = 60.0
PROBE_ELEMENTS = 1 << 24  # a trial feeding more elements than this (all inputs) is skipped

_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand"}
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
_MASK = re.compile(r"mask", re.IGNORECASE)
_STATE = re.compile(r"state|hidden|^h0$|^c0$|_h$|_c$|cache|past", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# What a job may say


class InputSpec(BaseModel):
    """One model input as a job gives it: a ``shape`` (every dim >= 1) and/or a ``value``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: list[Annotated[int, Field(ge=1, le=MAX_INPUT_DIM)]] | None = Field(
        None, max_length=MAX_INPUT_RANK,
        description="The input's full shape (rank as declared; static dims as declared).")
    value: bool | int | float | None = Field(
        None, description="Fill the input with this number instead of generated values "
        "(a sample rate, a flag); a scalar input takes it as is.")

    @model_validator(mode="after")
    def _bounded(self) -> InputSpec:
        if self.shape is None and self.value is None:
            raise ValueError("give a shape, a value or both")
        if self.shape is not None and math.prod(self.shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"the shape holds {math.prod(self.shape)} elements; at most "
                             f"{MAX_INPUT_ELEMENTS} are allowed")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ValueError("the value must be finite")
        return self


InputName = Annotated[str, Field(min_length=1, max_length=256)]
JobInputs = dict[InputName, InputSpec]


class _InputsModel(BaseModel):
    inputs: JobInputs = Field(default_factory=dict, max_length=MAX_INPUTS)


def parse_inputs(value: Any) -> dict[str, InputSpec]:
    """A job's ``inputs`` (JSON) validated; ``EngineError("invalid_inputs")`` with field errors."""
    if value is None:
        return {}
    try:
        return _InputsModel.model_validate({"inputs": value}).inputs
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                  for e in exc.errors()]
        raise EngineError("invalid_inputs", f"invalid inputs: {errors[0]['field']}: "
                          f"{errors[0]['message']}", {"errors": errors}) from None


@dataclass(frozen=True)
class InputSlot:
    """A model input as declared: ``dims`` has None for each dynamic dim; None if no shape."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None
    symbols: tuple[str | None, ...] = ()


def static_dim(d: onnx.TensorShapeProto.Dimension) -> int | None:
    """A declared dim's size, or None when it is dynamic (symbolic, unknown, -1 or 0)."""
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


def input_signature(model: onnx.ModelProto) -> list[InputSlot]:
    """The main graph's real inputs (initializers excluded) as ``InputSlot``s.

    Raises ``EngineError("unsupported_model")`` for a non-tensor input (sequence, map).
    """
    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        if not v.type.HasField("tensor_type"):
            raise EngineError("unsupported_model", f"input {v.name!r} is not a tensor "
                              "(sequence/map inputs are not supported)")
        tt = v.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise EngineError("unsupported_model", f"input {v.name!r} has an element type "
                              "ONNX cannot map to a NumPy type") from None
        dims = symbols = None
        if tt.HasField("shape"):
            dims = tuple(static_dim(d) for d in tt.shape.dim)
            symbols = tuple(d.dim_param or None if static_dim(d) is None else None
                            for d in tt.shape.dim)
        out.append(InputSlot(v.name, dtype, dims, symbols or ()))
    return out


def _fmt(dims: Sequence[int | None] | None) -> str:
    if dims is None:
        return "(any shape)"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_inputs(given: dict[str, InputSpec], slots: Sequence[InputSlot]) -> None:
    """Refuse given inputs that cannot fit the model: unknown names, wrong rank, a static dim
    contradicted, a value of the wrong kind. ``EngineError("invalid_inputs")`` with field errors.
    """
    by_name = {s.name: s for s in slots}
    errors: list[dict[str, str]] = []
    for name, spec in given.items():
        slot = by_name.get(name)
        if slot is None:
            errors.append({"field": f"inputs.{name}", "message": "not an input of the model "
                           f"(its inputs: {', '.join(sorted(by_name))})"})
            continue
        if spec.shape is not None and slot.dims is not None:
            if len(spec.shape) != len(slot.dims):
                errors.append({"field": f"inputs.{name}.shape", "message":
                               f"rank {len(spec.shape)}; the input is {_fmt(slot.dims)}"})
            else:
                bad = [i for i, (g, d) in enumerate(zip(spec.shape, slot.dims, strict=True))
                       if d is not None and g != d]
                if bad:
                    errors.append({"field": f"inputs.{name}.shape", "message":
                                   f"{spec.shape} contradicts the static dims of "
                                   f"{_fmt(slot.dims)} (axis {bad[0]})"})
        if spec.value is not None:
            kind, v = slot.dtype.kind, spec.value
            ok = (kind == "b" and (isinstance(v, bool) or v in (0, 1))) or (
                kind in "iu" and not isinstance(v, bool)
                and (isinstance(v, int) or float(v).is_integer())) or kind == "f"
            if ok and kind in "iu":
                info = np.iinfo(slot.dtype)
                ok = info.min <= int(v) <= info.max
            if not ok:
                errors.append({"field": f"inputs.{name}.value", "message":
                               f"{v!r} does not fit the input's type {slot.dtype}"})
    if errors:
        raise EngineError("invalid_inputs", f"{errors[0]['field']}: {errors[0]['message']}",
                          {"errors": errors})


def slots_from_description(inputs: Sequence[dict]) -> list[InputSlot]:
    """``InputSlot``s from a model description's ``inputs`` (what the API stores)."""
    out = []
    for v in inputs:
        dtype: np.dtype
        try:
            dtype = np.dtype(v.get("dtype"))
        except TypeError:
            dtype = np.dtype("float32")
        shape = v.get("shape")
        dims = None if shape is None else tuple(
            d if isinstance(d, int) and d > 0 else None for d in shape)
        out.append(InputSlot(v["name"], dtype, dims))
    return out


# ---------------------------------------------------------------------------------------------
# What the graph says about its inputs


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values of every graph, by name."""
    out: dict[str, onnx.TensorProto] = {}
    for g, _ in iter_graphs(model.graph):
        for t in g.initializer:
            out[t.name] = t
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                attr = next((a for a in node.attribute if a.name == "value"), None)
                if attr is not None and attr.HasField("t"):
                    out[node.output[0]] = attr.t
    return out


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g, _ in iter_graphs(model.graph) for n in g.node]


def _derived(nodes: Sequence[onnx.NodeProto], name: str) -> set[str]:
    """``name`` and every value computed from it by casts and reshapes only."""
    seen = {name}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] in seen:
                for o in node.output:
                    if o not in seen:
                        seen.add(o)
                        changed = True
    return seen


@dataclass
class _GraphFacts:
    index_rows: dict[str, tuple[int, str]] = field(default_factory=dict)  # input -> (rows, table)
    compared: dict[str, list[int | float]] = field(default_factory=dict)
    state_batch_axis: dict[str, int] = field(default_factory=dict)


def _graph_facts(model: onnx.ModelProto, names: Sequence[str]) -> _GraphFacts:
    nodes = _nodes(model)
    consts = _constants(model)
    facts = _GraphFacts()
    for name in names:
        derived = _derived(nodes, name)
        for node in nodes:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in derived \
                    and node.input[0] in consts:
                dims = list(consts[node.input[0]].dims)
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if dims and -len(dims) <= axis < len(dims):
                    rows = int(dims[axis])
                    if name not in facts.index_rows or rows < facts.index_rows[name][0]:
                        facts.index_rows[name] = (rows, node.input[0])
            elif node.op_type in _COMPARISONS and len(node.input) == 2:
                a, b = node.input
                other = b if a in derived else a if b in derived else None
                if other is not None and other in consts:
                    values = numpy_helper.to_array(consts[other]).ravel()[:4]
                    found = facts.compared.setdefault(name, [])
                    for v in values.tolist():
                        if v not in found:
                            found.append(v)
            elif node.op_type in ("LSTM", "GRU", "RNN"):
                layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
                for idx in (5, 6):
                    if len(node.input) > idx and node.input[idx] in derived:
                        facts.state_batch_axis[name] = 0 if layout else 1
    return facts


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class InputRule:
    """How one input is generated: its shape, the kind of values and why."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    values: str  # normal | integers | ones | constant | bool | positions
    high: int = 2  # integers: [0, high); positions: the first position
    constant: float | int | bool | None = None
    source: str = "model"  # job | model | probe | default
    why: str = ""

    def describe(self) -> dict[str, Any]:
        values = {"normal": "standard normal", "ones": "ones",
                  "bool": "random booleans",
                  "integers": f"integers in [0, {self.high})",
                  "constant": f"the constant {self.constant!r}",
                  "positions": f"positions {self.high}, {self.high + 1}, ... along the last "
                               "axis"}[self.values]
        return {"shape": list(self.shape), "dtype": str(self.dtype), "values": values,
                "source": self.source, "why": self.why}


@dataclass(frozen=True)
class InputPlan:
    """Resolved inputs: ``feeds(n, seed)`` generates feeds; ``record`` says what and why."""

    rules: tuple[InputRule, ...]
    record: dict[str, Any] = field(default_factory=dict)

    def feeds(self, samples: int, seed: int = 0) -> list[Feed]:
        """``samples`` feeds, reproducible for a seed (one generator, inputs in order)."""
        rng = np.random.default_rng(seed)
        out: list[Feed] = []
        for _ in range(samples):
            feed: Feed = {}
            for r in self.rules:
                if r.values == "normal":
                    feed[r.name] = rng.standard_normal(r.shape).astype(r.dtype)
                elif r.values == "integers":
                    feed[r.name] = rng.integers(0, max(r.high, 1), size=r.shape).astype(r.dtype)
                elif r.values == "bool":
                    feed[r.name] = rng.integers(0, 2, size=r.shape).astype(bool)
                elif r.values == "ones":
                    feed[r.name] = np.ones(r.shape, r.dtype)
                elif r.values == "positions":
                    feed[r.name] = np.broadcast_to(np.arange(
                        r.high, r.high + (r.shape[-1] if r.shape else 1), dtype=r.dtype),
                        r.shape).copy()
                else:
                    feed[r.name] = np.full(r.shape, r.constant, r.dtype)
            out.append(feed)
        return out

    def shapes(self) -> dict[str, list[int]]:
        return {r.name: list(r.shape) for r in self.rules}

    def as_inputs(self) -> dict[str, dict[str, Any]]:
        """The plan as job ``inputs`` (shapes, and values where they are constants): a pipeline
        given these builds the same plan without probing."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.rules:
            if r.source == "decoder":  # derived from the token ids by ``decoder_plan``
                continue
            spec: dict[str, Any] = {"shape": list(r.shape)} if r.shape else {}
            if r.values == "constant":
                spec["value"] = r.constant
            out[r.name] = spec or {"value": r.constant}
        return out


def _role(slot: InputSlot, axis: int, facts: _GraphFacts) -> str:
    dims = slot.dims or ()
    rank = len(dims)
    kind = slot.dtype.kind
    state_axis = facts.state_batch_axis.get(slot.name)
    if state_axis is None and kind == "f" and rank == 3 and _STATE.search(slot.name):
        state_axis = 1
    if state_axis is not None:
        return "batch" if axis == state_axis else "other"
    if axis == 0 and rank >= 2:
        return "batch"
    if kind in "iub" or _MASK.search(slot.name):
        return "sequence"
    if kind == "f" and rank == 4:
        channels_last = dims[3] is not None and dims[3] <= 4 and not (
            dims[1] is not None and dims[1] <= 4)
        spatial = (1, 2) if channels_last else (2, 3)
        return "spatial" if axis in spatial else "channels"
    if kind == "f" and rank in (1, 2):
        return "signal"
    if kind == "f" and rank == 3:
        if axis == 2 and (dims[1] is None or dims[1] <= 16):
            return "signal"
        if axis == 1 and dims[2] is not None:
            return "sequence"
    return "other"


_CANDIDATES: dict[str, tuple[int, ...]] = {
    "batch": (DEFAULT_BATCH,), "spatial": IMAGE_SIDES, "signal": SIGNAL_LENGTHS,
    "sequence": SEQUENCE_LENGTHS, "channels": (3, 1), "other": OTHER_DIMS,
}
_ROLE_RANK = {"batch": 0, "sequence": 1, "spatial": 2, "signal": 3, "channels": 4, "other": 5}
_ROLE_WORDS = {"batch": "a batch axis", "spatial": "the spatial axes of an image-like input",
               "signal": "the length of a signal", "sequence": "a sequence length",
               "channels": "a channel axis", "other": "a dynamic dim"}


@dataclass
class _Draft:
    """The parts of a plan before trial values are chosen."""

    slots: list[InputSlot]
    given: dict[str, InputSpec]
    facts: _GraphFacts
    # per input, per axis: a fixed size or the key of a variable
    axes: dict[str, list[int | tuple[str, ...]]]
    variables: dict[tuple[str, ...], str]  # variable key -> role
    scalar_choices: dict[str, list[int | float | bool]]  # input -> value candidates


def _draft(model: onnx.ModelProto, given: dict[str, InputSpec]) -> _Draft:
    slots = input_signature(model)
    check_inputs(given, slots)
    facts = _graph_facts(model, [s.name for s in slots])
    axes: dict[str, list[int | tuple[str, ...]]] = {}
    variables: dict[tuple[str, ...], str] = {}
    bound: dict[tuple[str, ...], int] = {}
    scalar_choices: dict[str, list[int | float | bool]] = {}
    for slot in slots:
        spec = given.get(slot.name)
        if slot.dims is None:
            # No declared shape: a given shape, else a scalar-like [1] guess.
            axes[slot.name] = list(spec.shape) if spec and spec.shape else [DEFAULT_BATCH]
            continue
        row: list[int | tuple[str, ...]] = []
        for axis, d in enumerate(slot.dims):
            symbol = slot.symbols[axis] if axis < len(slot.symbols) else None
            key = ("sym", symbol) if symbol else ("anon", slot.name, str(axis))
            if spec is not None and spec.shape is not None:
                row.append(spec.shape[axis])
                if d is None:
                    bound.setdefault(key, spec.shape[axis])
                continue
            if d is not None:
                row.append(d)
                continue
            role = _role(slot, axis, facts)
            if key not in variables or _ROLE_RANK[role] < _ROLE_RANK[variables[key]]:
                variables[key] = role
            row.append(key)
        axes[slot.name] = row
        scalar = all(isinstance(a, int) for a in row) and math.prod(
            a for a in row if isinstance(a, int)) == 1
        if scalar and slot.dtype.kind in "iu" and (spec is None or spec.value is None) \
                and not _MASK.search(slot.name):
            seen = [int(v) for v in facts.compared.get(slot.name, []) if float(v).is_integer()]
            choices: list[int | float | bool] = list(seen)
            choices += [v for v in (1, 0) if v not in seen]
            scalar_choices[slot.name] = choices
    # A symbol bound by a given shape has that value everywhere.
    for name, row in axes.items():
        axes[name] = [bound.get(a, a) if isinstance(a, tuple) else a for a in row]
    variables = {k: r for k, r in variables.items() if k not in bound}
    return _Draft(slots, given, facts, axes, variables, scalar_choices)


def _rule(slot: InputSlot, shape: tuple[int, ...], draft: _Draft, source: str, why: str,
          scalar_value: int | float | bool | None = None) -> InputRule:
    spec = draft.given.get(slot.name)
    kind = slot.dtype.kind
    if spec is not None and spec.value is not None:
        return InputRule(slot.name, slot.dtype, shape, "constant", constant=spec.value,
                         source="job", why="given with the job")
    if scalar_value is not None:
        compared = draft.facts.compared.get(slot.name, [])
        reason = ("a value the graph compares it against" if scalar_value in compared
                  else "a small scalar integer")
        return InputRule(slot.name, slot.dtype, shape, "constant", constant=scalar_value,
                         source=source, why=f"{why}; value {scalar_value}: {reason}")
    if _MASK.search(slot.name):
        return InputRule(slot.name, slot.dtype, shape, "ones", source=source,
                         why=f"{why}; ones (a mask: every position valid)")
    if kind == "f":
        if not shape or (math.prod(shape) == 1 and len(shape) <= 1):
            return InputRule(slot.name, slot.dtype, shape, "constant", constant=1.0,
                             source=source, why=f"{why}; a float scalar: 1.0")
        return InputRule(slot.name, slot.dtype, shape, "normal", source=source, why=why)
    if kind == "b":
        return InputRule(slot.name, slot.dtype, shape, "bool", source=source, why=why)
    if kind in "iu":
        rows = draft.facts.index_rows.get(slot.name)
        if rows is not None:
            return InputRule(slot.name, slot.dtype, shape, "integers", high=rows[0],
                             source=source, why=f"{why}; ids index the {rows[0]} rows of "
                             f"{rows[1]!r}")
        return InputRule(slot.name, slot.dtype, shape, "integers", high=2, source=source,
                         why=why)
    raise EngineError("unsupported_model", f"cannot generate inputs for {slot.name!r} of "
                      f"type {slot.dtype}; give a dataset")


def _build(draft: _Draft, assignment: dict[tuple[str, ...], int],
           scalars: dict[str, int | float | bool], probed: bool) -> InputPlan:
    rules = []
    for slot in draft.slots:
        row = draft.axes[slot.name]
        shape = tuple(assignment[a] if isinstance(a, tuple) else a for a in row)
        spec = draft.given.get(slot.name)
        dynamic = [a for a in row if isinstance(a, tuple)]
        if spec is not None and spec.shape is not None:
            source, why = "job", "shape given with the job"
        elif dynamic:
            first: dict[str, int] = {}
            for a in dynamic:
                first.setdefault(draft.variables[a], assignment[a])
            words = " and ".join(f"{_ROLE_WORDS[r]} ({v})" for r, v in
                                 sorted(first.items(), key=lambda kv: _ROLE_RANK[kv[0]]))
            source = "probe" if probed else "default"
            why = (f"dynamic dims: {words}, the first trial on which the model runs with "
                   "finite outputs" if probed else f"dynamic dims: {words} (not probed)")
        else:
            source, why = ("model", "static shape declared by the model") \
                if slot.dims is not None else ("default", "no shape declared")
        rules.append(_rule(slot, shape, draft, source, why, scalars.get(slot.name)))
    return InputPlan(tuple(rules))


# ---------------------------------------------------------------------------------------------
# Causal decoders (``service.engine.decoder`` recognises them)

DECODER_PROMPT = 64  # the prompt length of a decoder's generated prefill


def decoder_plan(model: onnx.ModelProto, spec: DecoderSpec,
                 given: dict[str, InputSpec] | None = None,
                 prompt_length: int = DECODER_PROMPT) -> InputPlan:
    """A decoder's prefill: token ids drawn from the embedding table's rows (``[batch,
    prompt]``, from the job's ``input_ids`` shape when given), an attention mask of ones,
    position ids 0..L-1 and past tensors of length 0 (``[batch, heads, 0, head_dim]``)."""
    given = given or {}
    check_inputs(given, input_signature(model))
    ids_spec = given.get(spec.input_ids)
    source = "job" if ids_spec is not None and ids_spec.shape else "default"
    batch, length = (ids_spec.shape if ids_spec is not None and ids_spec.shape
                     else (DEFAULT_BATCH, prompt_length))
    why = (f"a causal decoder ({spec.recognised_by}): prefill of {length} tokens, past 0")
    rules = [InputRule(spec.input_ids, np.dtype(spec.ids_dtype), (batch, length), "integers",
                       high=spec.vocab, source=source,
                       why=f"{why}; token ids in [0, {spec.vocab}) (the vocabulary)")]
    if spec.attention_mask:
        rules.append(InputRule(spec.attention_mask, np.dtype(spec.mask_dtype), (batch, length),
                               "ones", source="decoder", why=f"{why}; every position attended"))
    if spec.position_ids:
        rules.append(InputRule(spec.position_ids, np.dtype(spec.positions_dtype),
                               (batch, length), "positions", high=0, source="decoder",
                               why=f"{why}; positions 0..{length - 1}"))
    for p in spec.past:
        rules.append(InputRule(p.input, np.dtype(p.dtype), (batch, p.heads, 0, p.head_dim),
                               "constant", constant=0.0, source="decoder",
                               why=f"{why}; empty KV cache"))
    return InputPlan(tuple(rules), {"inputs": {r.name: r.describe() for r in rules},
                                    "probed": False, "decoder": spec.describe()})


def _resolve_decoder(model: onnx.ModelProto, spec: DecoderSpec, session: Any,
                     given: dict[str, InputSpec], scrub: Callable[[str], str],
                     seed: int) -> InputPlan:
    """``decoder_plan`` checked on ``session``: the prefill runs with finite logits, and so does
    one decode step fed the prefill's ``present`` tensors as its past (length L)."""

    plan = decoder_plan(model, spec, given)
    feed = plan.feeds(1, seed)[0]
    length = int(feed[spec.input_ids].shape[1])
    names = [o.name for o in session.get_outputs()]
    try:
        out = dict(zip(names, session.run(names, adapt_feed(session, feed)), strict=True))
        step = decode_feed(spec, feed[spec.input_ids][:, -1:], out, length)
        stepped = session.run(names, adapt_feed(session, step))
    except Exception as exc:
        raise EngineError("unsupported_model", "ONNX Runtime cannot run the decoder's prefill "
                          f"and decode step: {_short(exc, scrub)}. Give the token ids' shape "
                          f"(\"inputs\": {{\"{spec.input_ids}\": {{\"shape\": [1, 64]}}}}) "
                          "or a dataset of token ids", {"eval_inputs": "generated"}) from None
    if not (_finite(list(out.values())) and _finite(stepped)):
        raise EngineError("unsupported_model", "the decoder's logits hold NaN or infinite "
                          "values on generated token ids; give a dataset of token ids",
                          {"eval_inputs": "generated"})
    record = dict(plan.record)
    record["decoder_steps"] = {
        "prefill": {k: list(v.shape) for k, v in feed.items()},
        "decode": {k: list(v.shape) for k, v in step.items()},
        "note": "both ran on the original model; the decode step's past is the prefill's "
                "present (KV cache on the host)"}
    return InputPlan(plan.rules, record)


def default_plan(model: onnx.ModelProto, given: dict[str, InputSpec] | None = None,
                 dynamic_dim: int = DEFAULT_DYNAMIC_DIM) -> InputPlan:
    """A plan without probing: batch axes 1, other dynamic dims ``dynamic_dim`` (a causal
    decoder: ``decoder_plan``)."""
    spec = decoder_spec(model)
    if spec is not None:
        return decoder_plan(model, spec, given)
    draft = _draft(model, given or {})
    assignment = {k: DEFAULT_BATCH if r == "batch" else dynamic_dim
                  for k, r in draft.variables.items()}
    scalars = {n: c[0] for n, c in draft.scalar_choices.items()}
    plan = _build(draft, assignment, scalars, probed=False)
    return InputPlan(plan.rules, {"inputs": {r.name: r.describe() for r in plan.rules},
                                  "probed": False})


def _trials(draft: _Draft) -> Iterator[tuple[dict[tuple[str, ...], int], dict[str, Any]]]:
    """Assignments of every variable and scalar, most likely first: every role's first
    candidate, then combinations by the sum of their candidates' ranks."""
    roles = sorted({r for r in draft.variables.values()}, key=_ROLE_RANK.__getitem__)
    axes: list[tuple[str, Sequence[Any]]] = [(f"role:{r}", _role_candidates(draft, r))
                                             for r in roles]
    axes += [(f"value:{n}", c) for n, c in draft.scalar_choices.items()]
    if not axes:
        yield {}, {}
        return
    sizes = [len(c) for _, c in axes]
    combos = sorted(itertools.product(*(range(s) for s in sizes)),
                    key=lambda idx: (sum(idx), max(idx), idx))
    for idx in combos:
        chosen = {k: c[i] for (k, c), i in zip(axes, idx, strict=True)}
        assignment = {key: chosen[f"role:{role}"] for key, role in draft.variables.items()}
        scalars = {n: chosen[f"value:{n}"] for n in draft.scalar_choices}
        yield assignment, scalars


def _role_candidates(draft: _Draft, role: str) -> list[int]:
    """A role's candidates; sizes the job gave for the same role (another input) first."""
    first = []
    for slot in draft.slots:
        spec = draft.given.get(slot.name)
        if spec is None or spec.shape is None or slot.dims is None:
            continue
        for axis, d in enumerate(slot.dims):
            if d is None and _role(slot, axis, draft.facts) == role \
                    and spec.shape[axis] not in first:
                first.append(spec.shape[axis])
    return first + [c for c in _CANDIDATES[role] if c not in first]


def _finite(outputs: Sequence[Any]) -> bool:
    for out in outputs:
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return False
    return True


def _short(exc: BaseException, scrub: Callable[[str], str]) -> str:
    """ONNX Runtime's reason without its framing, source locations and C++ signatures."""
    text = scrub(str(exc)).strip()
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = re.sub(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' "
                  r"Status Message:\s*", r"\1 node '\2': ", text)
    text = re.sub(r"/?(?:[\w.\-]+/)*[\w.\-]+\.(?:h|cc|cpp):\d+\s*", "", text)
    text = re.sub(r"(?:[\w:<>~*&]+ )?[\w<>~]+(?:::[\w<>~]+)+\([^)]*\)\s*", "", text)
    text = " ".join(text.split())
    return (text or type(exc).__name__)[:300]


def resolve_inputs(
    model: onnx.ModelProto,
    session: Any,
    given: dict[str, InputSpec] | None = None,
    *,
    scrub: Callable[[str], str] = lambda s: s,
    max_trials: int = PROBE_TRIALS,
    max_seconds: float = PROBE_SECONDS,
    seed: int = 0,
    check_cancelled: Callable[[], None] = lambda: None,
) -> InputPlan:
    """The plan evaluation generates from: given shapes and values, static dims, then probing
    of the dynamic ones on ``session`` (an ONNX Runtime session of ``model``).

    Raises ``EngineError("invalid_inputs")`` for given inputs that do not fit the model and
    ``EngineError("unsupported_model")`` when the model runs on no trial (what failed, on which
    shapes, and what the user can give).
    """
    given = given or {}
    spec = decoder_spec(model)
    if spec is not None:
        return _resolve_decoder(model, spec, session, given, scrub, seed)
    draft = _draft(model, given)
    probing = bool(draft.variables or draft.scalar_choices)
    started = time.perf_counter()
    failures: list[tuple[dict[str, list[int]], dict[str, Any], str]] = []
    tried = skipped = 0
    import onnxruntime as ort


    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed trial is expected: keep the worker log clean
    for assignment, scalars in _trials(draft):
        check_cancelled()
        if tried >= max_trials or (tried and time.perf_counter() - started > max_seconds):
            break
        plan = _build(draft, assignment, scalars, probed=probing)
        shapes = plan.shapes()
        if sum(math.prod(s) for s in shapes.values()) > PROBE_ELEMENTS and probing:
            skipped += 1
            continue
        tried += 1
        feed = plan.feeds(1, seed)[0]
        try:
            outputs = session.run(None, adapt_feed(session, feed), quiet)
        except Exception as exc:  # the model does not run on this trial: the next one
            failures.append((shapes, scalars, _short(exc, scrub)))
            continue
        if not _finite(outputs):
            failures.append((shapes, scalars, "outputs hold NaN or infinite values"))
            continue
        record: dict[str, Any] = {"inputs": {r.name: r.describe() for r in plan.rules},
                                  "probed": probing}
        if probing:
            record["probe"] = {
                "trials": tried, "seconds": round(time.perf_counter() - started, 3),
                "failed": [{"shapes": s, "values": v, "error": e} for s, v, e in failures[:5]],
                "chosen": {"shapes": shapes, "values": scalars},
            }
        return InputPlan(plan.rules, record)
    raise _refusal(draft, failures, tried, skipped, probing, given)


def _refusal(draft: _Draft, failures: list[tuple[dict, dict, str]], tried: int, skipped: int,
             probing: bool, given: dict[str, InputSpec]) -> EngineError:
    by_error: dict[str, tuple[str, list[dict[str, list[int]]]]] = {}
    for shapes, _values, error in failures:  # one line per reason, numbers aside
        by_error.setdefault(re.sub(r"\d+", "#", error), (error, []))[1].append(shapes)
    parts = []
    for error, shape_sets in by_error.values():
        shown = "; ".join(", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}"
                                    for k, v in s.items()) for s in shape_sets[:3])
        more = f" and {len(shape_sets) - 3} more" if len(shape_sets) > 3 else ""
        parts.append(f"{error!r} on {shown}{more}")
    dynamic = [s.name for s in draft.slots
               if any(isinstance(a, tuple) for a in draft.axes[s.name])]
    scalars = list(draft.scalar_choices)
    hints = []
    if dynamic or not given:
        slot = next((s for s in draft.slots if s.name in dynamic), None) or (
            draft.slots[0] if draft.slots else None)
        name = slot.name if slot is not None else "x"
        shape = "x".join(
            str(a) if isinstance(a, int) else "1" if draft.variables.get(a) == "batch" else "<n>"
            for a in (draft.axes.get(name, []) if slot is not None else [])) or "<n>"
        hints.append(f"the input shapes (--input-shape {name}={shape}, or \"inputs\": "
                     f"{{\"{name}\": {{\"shape\": [...]}}}} in the job)")
    if scalars:
        hints.append(f"the values of {', '.join(scalars)} (--input-value {scalars[0]}=16000)")
    hints.append("a dataset of real inputs")
    where = (f"on {'any of the ' + str(tried) + ' input shapes tried' if probing else 'its inputs'}"
             + (f" ({skipped} larger ones skipped)" if skipped else ""))
    message = (f"ONNX Runtime cannot run the original model {where}: "
               + " | ".join(parts)[:900] + ". Give " + ", ".join(hints[:-1])
               + (" or " if len(hints) > 1 else "") + hints[-1])
    return EngineError("unsupported_model", message, {
        "eval_inputs": "generated", "tried": tried,
        "failures": [{"shapes": s, "values": v, "error": e} for s, v, e in failures[:10]],
        "dynamic_inputs": dynamic, "scalar_inputs": scalars})


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def adapt_feed(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast a feed to the session's input types (a pass may have changed an input's dtype)."""
    out = {}
    for i in session.get_inputs():
        arr = feed[i.name]
        want = _ORT_TYPES.get(i.type)
        out[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    return out
