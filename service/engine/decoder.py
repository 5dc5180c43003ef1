"""Causal decoders: recognising one from its graph, and the feeds it takes.

Recognition (``decoder_spec``): an integer input of token ids (named ``input_ids``, or a 2-D
integer input that indexes a constant embedding table through ``Gather``), a 3-D float output
of logits, and a KV cache: ``past_key_values.*`` / ``past.*`` inputs paired with ``present.*``
outputs by name (the layout of ``transformers`` / Optimum / ONNX Runtime GenAI exports), or
ONNX Runtime's ``GroupQueryAttention`` / ``MultiHeadAttention`` contrib ops whose past and
present tensors are graph inputs and outputs. Past tensors are ``[batch, heads, past,
head_dim]``: heads and head_dim come from the declared shapes. Every other input must be an
attention mask or position ids, else the model is not taken for a decoder.

Feeds (``prefill_feed``, ``decode_feed``): token ids, an attention mask of ones over past +
current tokens, position ids ``past .. past + L - 1``, and the past tensors (length 0 for a
prefill; the previous step's ``present.*`` for a decode step).

Only numpy and onnx: the API (dataset inspection), input resolution and planning use it;
``service.engine.lm`` evaluates decoders as language models.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

Feed = dict[str, np.ndarray]

_IDS = re.compile(r"^(input_ids|ids|tokens?|token_ids)$", re.IGNORECASE)
_MASK = re.compile(r"attention_mask", re.IGNORECASE)
_POSITIONS = re.compile(r"position_ids", re.IGNORECASE)
_PAST = re.compile(r"^(past_key_values|past_key_value|past)([._].*)$")
_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention")
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclass(frozen=True)
class PastSlot:
    """One KV-cache tensor: its graph input, the output that returns it grown, its dims."""

    input: str
    output: str
    heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class DecoderSpec:
    """A recognised causal decoder (module docstring)."""

    input_ids: str
    logits: str
    vocab: int
    attention_mask: str | None
    position_ids: str | None
    past: tuple[PastSlot, ...]
    recognised_by: str
    ids_dtype: str = "int64"
    mask_dtype: str = "int64"
    positions_dtype: str = "int64"

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["past"] = {"tensors": len(self.past), "inputs": [p.input for p in self.past[:4]],
                     "heads": sorted({p.heads for p in self.past}),
                     "head_dim": sorted({p.head_dim for p in self.past})}
        return d


# ---------------------------------------------------------------------------------------------
# Recognition


def _np_dtype(elem_type: int) -> str:
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _dims(v: onnx.ValueInfoProto) -> list[int | None] | None:
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim]


def _table_rows(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the constant table ``name`` indexes through ``Gather`` (casts and reshapes
    followed), the smallest when several."""
    inits = {t.name: t for t in model.graph.initializer}
    seen, changed = {name}, True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] in seen:
                for o in node.output:
                    if o not in seen:
                        seen.add(o)
                        changed = True
    rows = [int(inits[n.input[0]].dims[0]) for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in seen
            and n.input[0] in inits and inits[n.input[0]].dims]
    return min(rows) if rows else None


def _past_slot(inp: onnx.ValueInfoProto, out: onnx.ValueInfoProto) -> PastSlot | None:
    dims = _dims(inp) or _dims(out)
    if dims is None or len(dims) != 4 or dims[1] is None or dims[3] is None:
        return None
    return PastSlot(inp.name, out.name, dims[1], dims[3],
                    _np_dtype(inp.type.tensor_type.elem_type))


def decoder_spec(model: onnx.ModelProto) -> DecoderSpec | None:
    """The model as a causal decoder, or None when it is not recognisably one."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits
              and v.type.HasField("tensor_type")]
    outputs = {v.name: v for v in model.graph.output if v.type.HasField("tensor_type")}
    ints = [v for v in inputs if np.dtype(
        helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).kind in "iu"]
    ids = next((v for v in ints if _IDS.match(v.name)), None)
    if ids is None:
        ids = next((v for v in ints if (d := _dims(v)) is not None and len(d) == 2
                    and not _MASK.search(v.name) and not _POSITIONS.search(v.name)
                    and _table_rows(model, v.name) is not None), None)
    if ids is None or (d := _dims(ids)) is None or len(d) != 2:
        return None
    rows = _table_rows(model, ids.name)
    logits = None
    for v in outputs.values():
        od = _dims(v)
        if od is not None and len(od) == 3 and v.type.tensor_type.elem_type in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and (
                logits is None or v.name == "logits"):
            logits = v
    if logits is None:
        return None
    logit_dims = _dims(logits) or []
    vocab = logit_dims[2] if len(logit_dims) == 3 and logit_dims[2] else rows
    if not vocab:
        return None
    by_name = {v.name: v for v in inputs}
    past: list[PastSlot] = []
    how = None
    for v in inputs:
        m = _PAST.match(v.name)
        if m is None:
            continue
        out = outputs.get("present" + m.group(2))
        slot = _past_slot(v, out) if out is not None else None
        if slot is not None:
            past.append(slot)
    if past:
        how = "past_key_values.* inputs paired with present.* outputs"
    else:
        for node in model.graph.node:
            if node.op_type not in _ATTENTION_OPS:
                continue
            # GroupQueryAttention: past_key 3, past_value 4 -> present 1, 2; MultiHeadAttention:
            # past_key 6, past_value 7 -> present 1, 2.
            pairs = ((3, 1), (4, 2)) if node.op_type == "GroupQueryAttention" else ((6, 1), (7, 2))
            for i, o in pairs:
                if len(node.input) > i and len(node.output) > o and node.input[i] in by_name \
                        and node.output[o] in outputs:
                    slot = _past_slot(by_name[node.input[i]], outputs[node.output[o]])
                    if slot is not None:
                        past.append(slot)
            how = f"ONNX Runtime {node.op_type} contrib ops with past/present graph tensors"
        if not past:
            return None
    mask = next((v for v in inputs if _MASK.search(v.name)), None)
    positions = next((v for v in inputs if _POSITIONS.search(v.name)), None)
    covered = {ids.name, *(p.input for p in past), *(v.name for v in (mask, positions) if v)}
    if any(v.name not in covered for v in inputs):
        return None  # an input we would not know how to feed
    return DecoderSpec(
        ids.name, logits.name, int(vocab), mask.name if mask else None,
        positions.name if positions else None, tuple(past), how or "",
        _np_dtype(ids.type.tensor_type.elem_type),
        _np_dtype(mask.type.tensor_type.elem_type) if mask else "int64",
        _np_dtype(positions.type.tensor_type.elem_type) if positions else "int64")


# ---------------------------------------------------------------------------------------------
# Feeds


def prefill_feed(spec: DecoderSpec, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
                 past_length: int = 0) -> Feed:
    """The feed for ``ids`` [batch, L] after ``past_length`` cached tokens (``past``: the
    tensors by input name; zero-length past when None)."""
    ids = np.asarray(ids)
    batch, length = ids.shape
    feed: Feed = {spec.input_ids: ids.astype(spec.ids_dtype)}
    if spec.attention_mask:
        feed[spec.attention_mask] = np.ones((batch, past_length + length), spec.mask_dtype)
    if spec.position_ids:
        feed[spec.position_ids] = np.broadcast_to(
            np.arange(past_length, past_length + length, dtype=spec.positions_dtype),
            (batch, length)).copy()
    for p in spec.past:
        feed[p.input] = (past[p.input] if past is not None else
                         np.zeros((batch, p.heads, 0, p.head_dim), p.dtype))
    return feed


def decode_feed(spec: DecoderSpec, token: np.ndarray, present: dict[str, np.ndarray],
                past_length: int) -> Feed:
    """One decode step: ``token`` [batch, 1] with the previous step's ``present`` outputs (by
    output name) as the past of length ``past_length``."""
    return prefill_feed(spec, token, {p.input: present[p.output] for p in spec.past},
                        past_length)


def decoder_arrays(spec: DecoderSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A dataset's arrays for every decoder input from ``input_ids`` [N, L] alone: rows along
    the batch axis (mask of ones, positions 0..L-1, zero-length past)."""
    return prefill_feed(spec, ids)
