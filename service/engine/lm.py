"""Decoder LLMs: recognising a causal decoder, its feeds, and its language-model evaluation.

Recognition (``decoder_spec``): an integer input of token ids (named ``input_ids``, or a 2-D
integer input that indexes a constant embedding table through ``Gather``), a 3-D float output
of logits, and a KV cache: ``past_key_values.*`` / ``past.*`` inputs paired with ``present.*``
outputs by name (the layout of ``transformers`` / Optimum / ONNX Runtime GenAI exports), or
ONNX Runtime's ``GroupQueryAttention`` / ``MultiHeadAttention`` contrib ops whose past and
present tensors are graph inputs and outputs. Past tensors are ``[batch, heads, past,
head_dim]``: the past axis is the dynamic one after the batch axis; heads and head_dim come from
the declared shapes.

Feeds (``prefill_feed``, ``decode_feed``): token ids, an attention mask of ones over past +
current tokens, position ids ``past .. past + L - 1``, and the past tensors (length 0 for a
prefill; the previous step's ``present.*`` for a decode step).

Evaluation (``evaluate_lm``), on held-out token sequences, original against candidate, both on
ONNX Runtime's CPU provider with the job's thread count:

- next-token KL divergence KL(p_original || p_candidate) of the softmax of the logits at every
  position, averaged over positions and sequences (nats), and top-1 agreement (argmax equal);
- perplexity of each model, exp(mean next-token negative log-likelihood), on the targets: the
  dataset's ``labels`` [N, L] when given (label ``t`` is the token after position ``t``; -100
  is ignored), else the sequences themselves shifted by one;
- prefill tokens/s (one prompt of ``prompt_length`` tokens, past 0) and decode tokens/s
  (``decode_tokens`` greedy steps, one token each, ``present.*`` fed back as the next step's
  past: the KV cache stays on the host), medians of interleaved rounds (original, candidate,
  candidate, original, ...; per round the fastest of ``PREFILL_REPEATS`` prefills);
- peak memory: the peak resident-set size (``VmHWM``, Linux) of a fresh Python process that loads
  only that model into an ONNX Runtime session and runs the prefill and the decode loop, and its
  growth over the same process before the session is created (the interpreter, numpy and
  onnxruntime imported). One process per model, so the numbers do not mix.

Only numpy and onnx at import; onnxruntime inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from service.engine.errors import EngineError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

PROMPT_LENGTH = 64
DECODE_TOKENS = 32
LM_SEQUENCES = 16  # held-out sequences the KLD/perplexity are measured on, at most
SPEED_ROUNDS = 5
PREFILL_REPEATS = 3  # per round: the fastest of these prefills counts
MEMORY_TIMEOUT_S = 300.0
IGNORE_LABEL = -100

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


# ---------------------------------------------------------------------------------------------
# Evaluation


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _targets(ids: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Next-token targets per position (IGNORE_LABEL where there is none)."""
    if labels is not None:
        return np.asarray(labels, np.int64)
    out = np.full(ids.shape, IGNORE_LABEL, np.int64)
    out[:, :-1] = ids[:, 1:]
    return out


def _nll(logp: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    valid = targets != IGNORE_LABEL
    if not valid.any():
        return 0.0, 0
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return float(-picked[valid].sum()), int(valid.sum())


def _session_outputs(session: Any) -> list[str]:
    return [o.name for o in session.get_outputs()]


def _run(session: Any, spec: DecoderSpec, feed: Feed) -> dict[str, np.ndarray]:
    from service.engine.inputs import adapt_feed

    names = _session_outputs(session)
    return dict(zip(names, session.run(names, adapt_feed(session, feed)), strict=True))


def generate(session: Any, spec: DecoderSpec, prompt: np.ndarray, steps: int) -> tuple[
        float, float, list[int]]:
    """Greedy decoding of ``steps`` tokens after ``prompt`` [1, P] with the KV cache on the
    host: (prefill seconds, decode seconds, the tokens)."""
    t0 = time.perf_counter()
    out = _run(session, spec, prefill_feed(spec, prompt))
    prefill = time.perf_counter() - t0
    past = prompt.shape[1]
    token = int(np.argmax(out[spec.logits][0, -1]))
    tokens = [token]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        out = _run(session, spec, decode_feed(spec, np.array([[token]], np.int64), out, past))
        past += 1
        token = int(np.argmax(out[spec.logits][0, -1]))
        tokens.append(token)
    return prefill, time.perf_counter() - t0, tokens


def _speed(sessions: dict[str, Any], spec: DecoderSpec, prompt: np.ndarray, steps: int,
           rounds: int, check_cancelled: Callable[[], None]) -> dict[str, dict[str, float]]:
    for s in sessions.values():  # warm-up
        generate(s, spec, prompt, 2)
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        check_cancelled()
        for key in keys if r % 2 == 0 else list(reversed(keys)):
            pre, dec, _ = generate(sessions[key], spec, prompt, steps)
            for _ in range(PREFILL_REPEATS - 1):  # a prefill is short: time a few per round
                pre = min(pre, generate(sessions[key], spec, prompt, 1)[0])
            times[key][0].append(pre)
            times[key][1].append(dec)
    return {k: {"prefill_tokens_per_s": prompt.shape[1] / max(statistics.median(p), 1e-9),
                "decode_tokens_per_s": (steps - 1) / max(statistics.median(d), 1e-9)}
            for k, (p, d) in times.items()}


def peak_memory(path: Path, prompt: Sequence[int], steps: int, threads: int) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads ``path`` and generates (module docstring)."""
    arg = json.dumps({"path": str(path), "prompt": list(prompt), "steps": steps,
                      "threads": threads})
    try:
        done = subprocess.run([sys.executable, "-m", "service.engine.lm", arg],
                              capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S,
                              check=False)
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 \
            else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        result = None
    if result is None:
        return {"peak_rss_mb": None, "growth_mb": None, "error": "the memory probe failed"}
    return result


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory line (kB) in MB: ``VmRSS`` now, ``VmHWM`` its peak.

    ``VmHWM`` belongs to this process's address space, started at exec; ``ru_maxrss`` is not
    used, as Linux carries the parent's peak over into it across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise OSError(f"no {field} in /proc/self/status")


def _probe_main(arg: str) -> None:

    job = json.loads(arg)
    import onnxruntime  # noqa: F401  (counted in the baseline)

    from service.engine.evaluate import make_session

    base = _status_mb("VmRSS")
    session = make_session(Path(job["path"]), int(job["threads"]))
    spec = decoder_spec(onnx.load(job["path"], load_external_data=False))
    if spec is None:
        raise SystemExit(2)
    generate(session, spec, np.array([job["prompt"]], np.int64), int(job["steps"]))
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 2), "growth_mb": round(peak - base, 2),
                      "baseline_mb": round(base, 2), "rss_after_mb": round(
                          _status_mb("VmRSS"), 2)}))


def evaluate_lm(
    original_path: Path, candidate_path: Path, spec: DecoderSpec, sequences: np.ndarray,
    labels: np.ndarray | None = None, *, threads: int = 1, prompt_length: int = PROMPT_LENGTH,
    decode_tokens: int = DECODE_TOKENS, max_sequences: int = LM_SEQUENCES,
    rounds: int = SPEED_ROUNDS, memory: bool = True,
    check_cancelled: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The candidate against the original as language models (module docstring); JSON-able."""
    from service.engine.evaluate import make_session

    sequences = np.asarray(sequences, np.int64)[:max_sequences]
    targets = _targets(sequences, None if labels is None else np.asarray(labels)[:max_sequences])
    so = make_session(Path(original_path), threads)
    sc = make_session(Path(candidate_path), threads)
    kl_sum = agree = positions = 0.0
    nll = {"before": 0.0, "after": 0.0}
    counted = 0
    finite = True
    for i in range(len(sequences)):
        check_cancelled()
        feed = prefill_feed(spec, sequences[i:i + 1])
        lp = _log_softmax(_run(so, spec, feed)[spec.logits])
        lq = _log_softmax(_run(sc, spec, feed)[spec.logits])
        finite = finite and bool(np.isfinite(lq).all())
        kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        positions += lp.shape[0] * lp.shape[1]
        for key, logp in (("before", lp), ("after", lq)):
            nll[key] += _nll(logp, targets[i:i + 1])[0]
        counted += _nll(lp, targets[i:i + 1])[1]
    kld = kl_sum / positions if positions else None
    perplexity = {k: (math.exp(v / counted) if counted and math.isfinite(v / counted)
                      and v / counted < 700 else None) for k, v in nll.items()}
    prompt = sequences[:1, :min(prompt_length, sequences.shape[1])]
    speed = _speed({"before": so, "after": sc}, spec, prompt, decode_tokens, rounds,
                   check_cancelled)
    del so, sc
    out: dict[str, Any] = {
        "kl_divergence": kld if finite else None,
        "top1_agreement": agree / positions if positions else None,
        "perplexity_before": perplexity["before"],
        "perplexity_after": perplexity["after"],
        "perplexity_increase": (perplexity["after"] / perplexity["before"] - 1.0
                                if perplexity["before"] and perplexity["after"] else None),
        "prefill_tokens_per_s_before": speed["before"]["prefill_tokens_per_s"],
        "prefill_tokens_per_s_after": speed["after"]["prefill_tokens_per_s"],
        "decode_tokens_per_s_before": speed["before"]["decode_tokens_per_s"],
        "decode_tokens_per_s_after": speed["after"]["decode_tokens_per_s"],
        "sequences": int(len(sequences)), "sequence_length": int(sequences.shape[1]),
        "positions": int(positions), "perplexity_tokens": int(counted),
        "perplexity_targets": "labels" if labels is not None else "input_ids shifted by one",
        "prompt_length": int(prompt.shape[1]), "decode_tokens": decode_tokens,
        "rounds": rounds, "threads": threads, "kv_cache": "host (present fed back as past)",
        "decoder": spec.describe(),
    }
    if memory:
        before = peak_memory(Path(original_path), prompt[0].tolist(), decode_tokens, threads)
        after = peak_memory(Path(candidate_path), prompt[0].tolist(), decode_tokens, threads)
        out.update(peak_memory_mb_before=before.get("peak_rss_mb"),
                   peak_memory_mb_after=after.get("peak_rss_mb"),
                   memory={"before": before, "after": after, "how": (
                       "peak resident set (VmHWM) of a fresh process that loads only that "
                       "model in ONNX Runtime and runs the prefill and decode loop; growth_mb "
                       "is over the same process before the session was created")})
    return out


def lm_evaluation(
    original_path: Path, candidate_path: Path, model: onnx.ModelProto,
    feeds: Sequence[Feed], eval_set: dict[str, np.ndarray] | None,
    eval_labels: np.ndarray | None, *, threads: int,
    check_cancelled: Callable[[], None] = lambda: None,
) -> dict[str, Any] | None:
    """A job's ``lm`` section when ``model`` is a causal decoder (else None): ``evaluate_lm``
    on the evaluation token sequences (the dataset's evaluation split, never its calibration
    samples), or on the generated evaluation feeds' token ids without a dataset (random tokens:
    KL divergence and agreement still compare the two models; perplexity means little)."""
    spec = decoder_spec(model)
    if spec is None:
        return None
    if eval_set is not None and spec.input_ids in eval_set:
        sequences, source = np.asarray(eval_set[spec.input_ids]), "dataset"
        if sequences.ndim == 3:  # the samples layout: [N, 1, L]
            sequences = sequences[:, 0]
    else:
        sequences = np.concatenate([f[spec.input_ids] for f in feeds])
        source, eval_labels = "generated", None
    try:
        out = evaluate_lm(original_path, candidate_path, spec, sequences, eval_labels,
                          threads=threads, check_cancelled=check_cancelled)
    except EngineError as exc:
        if exc.code == "cancelled":
            raise
        return {"error": f"the language-model evaluation failed: {exc.message}",
                **{k: None for k in SUMMARY_KEYS}}
    except Exception as exc:  # ONNX Runtime refuses the candidate's decode loop: unmeasured
        log.warning("language-model evaluation failed", exc_info=True)
        return {"error": f"the language-model evaluation failed: {type(exc).__name__}",
                **{k: None for k in SUMMARY_KEYS}}
    out["source"] = source
    if source == "generated":
        out["note"] = ("no dataset: measured on random token ids; upload token sequences "
                       "(input_ids [N, L]) for held-out KL divergence and perplexity")
    return out


SUMMARY_KEYS = ("kl_divergence", "top1_agreement", "perplexity_before", "perplexity_after",
                "perplexity_increase", "prefill_tokens_per_s_before",
                "prefill_tokens_per_s_after", "decode_tokens_per_s_before",
                "decode_tokens_per_s_after", "peak_memory_mb_before", "peak_memory_mb_after")


def lm_summary(section: dict[str, Any]) -> dict[str, Any]:
    """The headline subset of an ``lm`` section (the summary's ``lm``)."""
    return {k: section.get(k) for k in SUMMARY_KEYS}


if __name__ == "__main__":  # the memory probe's child process
    _probe_main(sys.argv[1])
