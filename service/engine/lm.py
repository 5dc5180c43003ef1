"""Decoder LLMs evaluated as language models (``service.engine.decoder`` recognises them).

``evaluate_lm``, on held-out token sequences, original against candidate, both on ONNX
Runtime's CPU provider with the job's thread count:

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

numpy and onnx at import; onnxruntime (and ``service.engine.evaluate``'s sessions) inside the
functions.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.engine.decoder import DecoderSpec, decode_feed, decoder_spec, prefill_feed
from service.engine.errors import EngineError
from service.engine.inputs import adapt_feed
from service.engine.limits import EngineLimits

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

PROMPT_LENGTH = 64
DECODE_TOKENS = 32
LM_SEQUENCES = 16  # held-out sequences the KLD/perplexity are measured on, at most
SPEED_ROUNDS = 5
PREFILL_REPEATS = 3  # per round: the fastest of these prefills counts
MEMORY_TIMEOUT_S = 300.0
IGNORE_LABEL = -100


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
           rounds: int, check_cancelled: Callable[[], None]) -> dict[str, dict[str, float | None]]:
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


CHUNK_LOGITS_BYTES = 64 << 20  # an original run in segments: logits held per chunk, at most


def _chunked_logits(session: Any, spec: DecoderSpec, sequences: np.ndarray) -> Iterator[
        np.ndarray]:
    """The logits of each sequence (prefill, past 0) from a ``SegmentedSession``, computed a
    chunk of sequences at a time (each segment loaded once per chunk)."""
    per = int(sequences.shape[1]) * max(int(spec.vocab or 1), 1) * 4
    chunk = max(1, CHUNK_LOGITS_BYTES // max(per, 1))
    for start in range(0, len(sequences), chunk):
        feeds = [adapt_feed(session, prefill_feed(spec, sequences[i:i + 1]))
                 for i in range(start, min(start + chunk, len(sequences)))]
        for result in session.run_many(feeds, [spec.logits]):
            yield result[spec.logits]


PROBE_PEAKS_MB: list[float] = []  # each probe's own VmHWM in this process's lifetime


def peak_memory(path: Path, prompt: Sequence[int], steps: int, threads: int) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads ``path`` and generates (module docstring); the
    figure is also kept in ``PROBE_PEAKS_MB`` (the engine reports the largest beside its own
    peak)."""
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
    if isinstance(result.get("peak_rss_mb"), int | float):
        PROBE_PEAKS_MB.append(float(result["peak_rss_mb"]))
    return result


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory line (kB) in MB: ``VmRSS`` now, ``VmHWM`` its peak.

    ``VmHWM`` belongs to this process's address space, started at exec; ``ru_maxrss`` is not
    used, as Linux carries the parent's peak over into it across fork and exec."""
    from service.engine.devices.host import process_memory_kb

    kb = process_memory_kb().get(field)
    if kb is None:
        raise OSError(f"no {field} in /proc/self/status")
    return kb * 1024 / 1e6


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
    check_cancelled: Callable[[], None] = lambda: None, limits: EngineLimits | None = None,
) -> dict[str, Any]:
    """The candidate against the original as language models (module docstring); JSON-able.

    An original too large for the job's memory (``evaluate.original_session``: run segment by
    segment) gives its logits in chunks of sequences, each segment loaded once per chunk; its
    prefill/decode speed and memory are then not measured (a decode step segment by segment
    would time loading, not decoding) and ``original_unmeasured`` says so."""
    from service.engine.evaluate import make_session, original_session

    sequences = np.asarray(sequences, np.int64)[:max_sequences]
    targets = _targets(sequences, None if labels is None else np.asarray(labels)[:max_sequences])
    so = original_session(Path(original_path), threads, limits or EngineLimits())
    segmented = hasattr(so, "run_many")
    reference = _chunked_logits(so, spec, sequences) if segmented else None
    if segmented:
        del so
        so = None
    sc = make_session(Path(candidate_path), threads)
    kl_sum = agree = positions = 0.0
    nll = {"before": 0.0, "after": 0.0}
    counted = 0
    finite = True
    for i in range(len(sequences)):
        check_cancelled()
        feed = prefill_feed(spec, sequences[i:i + 1])
        lp = _log_softmax(next(reference) if reference is not None
                          else _run(so, spec, feed)[spec.logits])
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
    speed: dict[str, dict[str, float | None]] = {
        "before": {"prefill_tokens_per_s": None, "decode_tokens_per_s": None},
        **_speed({"after": sc} if segmented else {"before": so, "after": sc}, spec, prompt,
                 decode_tokens, rounds, check_cancelled)}
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
    if segmented:
        out["original_unmeasured"] = (
            "the original's prefill and decode speed and its memory were not measured: its "
            "weights pass what the job may hold at once (it was run segment by segment for "
            "the KL divergence, agreement and perplexity)")
    if memory:
        before = ({"peak_rss_mb": None, "skipped": out["original_unmeasured"]} if segmented
                  else peak_memory(Path(original_path), prompt[0].tolist(), decode_tokens,
                                   threads))
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
    check_cancelled: Callable[[], None] = lambda: None, limits: EngineLimits | None = None,
) -> dict[str, Any] | None:
    """A job's ``lm`` section when ``model`` is a causal decoder (else None): ``evaluate_lm``
    on the evaluation token sequences (the dataset's evaluation split, never its calibration
    samples), or on the generated evaluation feeds' token ids without a dataset (random tokens:
    KL divergence and agreement still compare the two models; perplexity is left out)."""
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
                          threads=threads, check_cancelled=check_cancelled, limits=limits)
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
    if source == "generated":  # random ids are no text: their perplexity would mislead
        out.update(perplexity_before=None, perplexity_after=None, perplexity_increase=None)
        out["note"] = ("no dataset: KL divergence and agreement measured on random token ids, "
                       "no perplexity; upload token sequences (input_ids [N, L]) for held-out "
                       "text")
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
