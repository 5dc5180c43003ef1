"""Evaluate a compressed model against its original: size, parameters, latency, fidelity, accuracy.

- Size: bytes of the single self-contained ``.onnx`` file on disk.
- Latency: ONNX Runtime on this host, CPU provider, at 1 intra-op thread and at the target's
  thread count where the target is this host (``latency_thread_counts``); at each, the
  original, the candidate and a placebo (a second session of the original) in one process,
  warmed up, then timed in interleaved rounds (A B C, C B A, ...) so that drift on a shared
  machine hits all alike; the median per model is reported, the speedup is the median of the
  per-round before/after ratios (pairs saw the same machine state), and the placebo's ratio
  is the noise band beside it. Each round times a burst of runs long enough (~5 ms) to be
  measurable.
- Fidelity, per output (recurrent state outputs included): cosine similarity, SQNR in dB (capped
  at 200 dB when the outputs are identical), max abs error, and top-1 agreement for
  classifier-like outputs (2-D ``[batch, classes]`` with at least 2 classes); null elsewhere.
- Accuracy: argmax of the first classifier-like output against the dataset labels.

Evaluation inputs come from the dataset (first ``limits.eval_samples`` samples, see
``service.engine.dataset.split_feeds``) or are generated with a fixed seed from an
``InputPlan`` (``service.engine.inputs``: given shapes and values, static dims, probed dynamic
dims). Without a plan, a default one: batch axes 1, other dynamic dims 16; floats standard
normal; integer inputs used as ``Gather`` indices into a constant table draw from its valid
rows, other integers from {0, 1}; masks are ones; booleans random.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.engine.dataset import split_feeds
from service.engine.external import NO_PREPACKING
from service.engine.ingest import parameter_count
from service.engine.inputs import InputPlan, adapt_feed, default_plan
from service.engine.limits import EngineLimits
from service.engine.wording import noise_band

SEED = 0
SQNR_CAP_DB = 200.0
_BURST_SECONDS = 0.005
# A placebo (the original timed against a second session of itself) farther off than this says
# the host was disturbed while it measured (other processes on its cores), not that the model's
# speed is that uncertain: such a measurement is taken again, and then not used to decide.
DISTURBED_BAND = 1.10

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Evaluation inputs


def generate_feeds(
    model: onnx.ModelProto, samples: int, seed: int = SEED, plan: InputPlan | None = None
) -> list[Feed]:
    """``samples`` feeds generated from ``plan`` (default: ``default_plan(model)``, unprobed)."""
    return (plan or default_plan(model)).feeds(samples, seed)


def dataset_feeds(
    model: onnx.ModelProto,
    dataset: dict[str, np.ndarray],
    labels: np.ndarray | None,
    samples: int,
) -> tuple[list[Feed], list[np.ndarray] | None]:
    """At most ``samples`` feeds of a loaded dataset (one sample each, or the model's fixed
    batch of rows), labels split alike."""
    return split_feeds(model, dataset, labels, samples)


# ---------------------------------------------------------------------------------------------
# Sessions and runs




def make_session(path: Path, threads: int, config: dict[str, str] | None = None, *,
                 profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime CPU session with fixed threads (intra ``threads``, inter 1), loaded
    from ``path`` (external data beside it). A model whose float MatMul/Gemm weights stay in
    external data (``external.float_weights_on_disk``) loads without weight prepacking
    (``NO_PREPACKING``), so that its weights are not copied into memory; the weights of any
    model kept in external data are read from one shared read-only mapping per file
    (``external.shared_initializers``), not from a private copy per session; once a session
    with prepacking is being made, the pages of the mapping it has copied are let go as it
    goes (``external.pages_released``).

    ``config``: session config entries (``SessionOptions.add_session_config_entry``), e.g.
    ``{"session.disable_quant_qdq": "1"}`` for a weight-only int8 model (see
    ``passes.quantize_weight_only.FOLD_AT_LOAD``). ``profile_prefix``: ONNX Runtime's
    profiler on, its file under that prefix (``report_html``)."""
    import onnxruntime as ort

    from service.engine.external import float_weights_on_disk, pages_released, shared_initializers

    opts = ort.SessionOptions()
    prepacking = not float_weights_on_disk(Path(path))
    if not prepacking:
        # ONNX Runtime maps external initializers, but prepacking copies every float
        # MatMul/Gemm weight into memory: the whole float model per session. Without it the
        # weights are read from the mapped files (page cache), at some cost in speed.
        opts.add_session_config_entry(*NO_PREPACKING)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    shared = shared_initializers(Path(path))
    for name, ortvalue in shared:
        opts.add_initializer(name, ortvalue)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    # A session that prepacks copies what it reads from the shared mapping: those file pages
    # need not stay resident, during its making or after (``external.pages_released``).
    with pages_released(Path(path)) if shared and prepacking else contextlib.nullcontext():
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    session._edgepress_shared = shared  # the mapping lives as long as the session
    return session


def original_session(path: Path, threads: int, limits: EngineLimits) -> Any:
    """A session of a job's original at ``path``: whole (``make_session``), or a
    ``segments.SegmentedSession`` where its weights pass the share of the job's memory it may
    hold at once (``segments.segment_budget``)."""
    from service.engine.segments import SegmentedSession, segment_budget

    budget = segment_budget(Path(path), limits)
    if budget is None:
        return make_session(path, threads)
    return SegmentedSession(Path(path), budget, threads)


def run_all(session: Any, feeds: Sequence[Feed]) -> dict[str, list[np.ndarray]]:
    """Outputs per output name, one array per feed (a ``SegmentedSession`` runs them all
    through each segment in turn)."""
    names = [o.name for o in session.get_outputs()]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    if hasattr(session, "run_many"):
        for result in session.run_many([adapt_feed(session, f) for f in feeds], names):
            for name in names:
                out[name].append(result[name])
        return out
    for feed in feeds:
        for name, value in zip(names, session.run(names, adapt_feed(session, feed)), strict=True):
            out[name].append(np.asarray(value))
    return out


def measure_latency(
    sessions: dict[str, Any], feed: Feed, *, runs: int, warmup: int,
    check_cancelled: Callable[[], None] = lambda: None,
    feeds_by_key: dict[str, Feed] | None = None,
) -> dict[str, dict]:
    """Median milliseconds per run for each session, measured interleaved in this process.

    Round ``r`` runs the sessions rotated by ``r`` (A B C, B C A, C A B, ...): every session
    takes every position equally often and always follows another one, so neither slow drift
    nor the thread pool the previous session leaves spinning (multi-threaded sessions) favours
    one of them. Each timed burst starts after one untimed run that wakes its own pool.
    """
    feeds = {k: adapt_feed(s, (feeds_by_key or {}).get(k, feed)) for k, s in sessions.items()}
    burst: dict[str, int] = {}
    for key, s in sessions.items():
        for _ in range(max(warmup, 1)):
            s.run(None, feeds[key])
        t0 = time.perf_counter()
        s.run(None, feeds[key])
        one = max(time.perf_counter() - t0, 1e-6)
        burst[key] = max(1, min(200, int(_BURST_SECONDS / one)))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(runs):
        check_cancelled()
        for key in rotation(keys, r):
            s, f, n = sessions[key], feeds[key], burst[key]
            s.run(None, f)
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, f)
            samples[key].append((time.perf_counter() - t0) * 1000.0 / n)
    out: dict[str, dict] = {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
            "runs": len(v), "runs_per_sample": burst[k], "samples_ms": v}
        for k, v in samples.items()
    }
    return out


def rotation(keys: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: ``keys`` rotated left by ``r``."""
    k = r % max(len(keys), 1)
    return list(keys[k:]) + list(keys[:k])


def band_high(band: float | Sequence[float] | None) -> float:
    """The upper end of a noise band given as ``[low, high]`` or as its upper end (1.0: none)."""
    if band is None:
        return 1.0
    return float(band) if isinstance(band, (int, float)) else float(band[1])


def disturbed(band: float | Sequence[float] | None) -> bool:
    """A placebo band wider than ``DISTURBED_BAND``: the host was disturbed while measuring."""
    return band_high(band) > DISTURBED_BAND


def paired_speedup(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """(median of per-round before/after ratios, fraction of rounds where after was faster).

    Rounds are interleaved, so each pair saw the same machine state: the paired median is far
    less noisy than a ratio of two medians.
    """
    ratios = [b / a for b, a in zip(before, after, strict=True) if a > 0]
    if not ratios:
        return 0.0, 0.0
    return statistics.median(ratios), sum(r > 1.0 for r in ratios) / len(ratios)


def latency_thread_counts(limits: EngineLimits, profile: Any = None) -> list[int]:
    """The intra-op thread counts latency is measured at; the last one decides.

    First ``limits.latency_threads`` (1 by default: how a single-core target, or one request on
    a busy server, runs); then, where the target is this host or runs the host's kernels
    (``DeviceProfile.same_kernels_as``), the target's own thread count: the host's usable
    cores for the host (``profile`` None or ``"host"``), else the profile's ``cores`` capped by
    the host's (a profile without ``cores``: the host's). Only counts that differ are kept.
    A target the host cannot stand for (other ISA, GPU, NPU) is measured at the first count
    only: its own latency is a cost-model estimate; so is every target when
    ``limits.latency_target_threads`` is off.
    """
    from service.engine.devices import host_profile

    host = host_profile()
    host_cores = host.cores or 1
    first = limits.latency_threads
    if not limits.latency_target_threads:
        return [first]
    if profile is None or profile.name == "host":
        device = host_cores
    elif profile.same_kernels_as(host):
        device = min(profile.cores or host_cores, host_cores)
    else:
        return [first]
    return [first] if device == first else [first, device]


def rounds_per_count(runs: int, counts: int) -> int:
    """Rounds per thread count: the budget of ``runs`` rounds split over ``counts`` counts,
    never below min(runs, 5) (a paired median of fewer rounds says little)."""
    return max(min(runs, 5), math.ceil(runs / max(counts, 1)))


def compare_latency(
    original_path: Path, candidate_path: Path, feed: Feed, *, runs: int,
    limits: EngineLimits, threads: Sequence[int] | None = None,
    check_cancelled: Callable[[], None] = lambda: None,
    sessions: list[Any] | None = None,
    candidate_config: dict[str, str] | None = None,
) -> dict:
    """Interleaved latency of original vs candidate at each thread count, with a placebo.

    At every count of ``threads`` (default ``[limits.latency_threads]``) three sessions are
    timed in interleaved rounds: the original ("before"), the candidate ("after") and a second
    session of the original ("placebo"). The placebo's paired ratio against the original is
    the noise of this host for this model: ``noise_band`` is (1/p, p) with p = max(r, 1/r),
    and a speedup inside it says nothing. The ``runs`` rounds are split over the counts
    (``rounds_per_count``). ``sessions`` ([before, after]) are reused at
    ``limits.latency_threads`` and handed over: the list is emptied, so that once their count is
    measured nothing holds them (one count's sessions are alive at a time: a candidate session
    holds its prepacked weights, a big model's several would not fit its memory limit);
    ``candidate_config`` (session config entries, see ``make_session``) is how every other
    candidate session is made.

    The top-level keys are the deciding count's (``decide``: the target's thread count unless
    the host was too busy to measure it); ``by_threads`` holds one entry per count, in order.
    """
    from service.engine.segments import segment_budget

    counts = list(threads or [limits.latency_threads])
    per = rounds_per_count(runs, len(counts))
    reused = list(sessions or []) if limits.latency_threads in counts else []
    if sessions is not None:
        sessions.clear()
    budget = segment_budget(Path(original_path), limits)

    def measure(count: int) -> dict:
        if reused and count == limits.latency_threads:
            so, sc = reused
            reused.clear()
        else:
            so = None if budget is not None else make_session(original_path, count)
            sc = make_session(candidate_path, count, candidate_config)
        if budget is not None:
            del so
            lat = _segmented_latency(original_path, budget, count, sc, feed, runs=per,
                                     warmup=limits.latency_warmup,
                                     check_cancelled=check_cancelled)
        else:
            sp = make_session(original_path, count)
            lat = measure_latency({"before": so, "after": sc, "placebo": sp}, feed, runs=per,
                                  warmup=limits.latency_warmup, check_cancelled=check_cancelled)
        speedup, wins = paired_speedup(lat["before"]["samples_ms"], lat["after"]["samples_ms"])
        placebo, _ = paired_speedup(lat["before"]["samples_ms"], lat["placebo"]["samples_ms"])
        band = noise_band(placebo)
        return {
            "threads": count, "rounds": per,
            "before_ms": lat["before"]["median_ms"], "after_ms": lat["after"]["median_ms"],
            "placebo_ms": lat["placebo"]["median_ms"],
            "speedup": speedup, "win_fraction": wins, "placebo_speedup": placebo,
            "noise_band": [round(band[0], 4), round(band[1], 4)] if band else None,
            "detail": lat,
            **({"original_segments": lat["segments"]} if "segments" in lat else {}),
        }

    entries = [measure(count) for count in counts]
    decision, note = decide(entries, lambda: measure(counts[-1]))
    extra = {"decision_note": note} if note else {}
    return {"before_ms": decision["before_ms"], "after_ms": decision["after_ms"],
            "speedup": decision["speedup"], "win_fraction": decision["win_fraction"],
            "placebo_speedup": decision["placebo_speedup"],
            "noise_band": decision["noise_band"],
            "threads": decision["threads"], "rounds": sum(e["rounds"] for e in entries),
            "rounds_per_thread_count": per, "thread_counts": counts,
            "warmup": limits.latency_warmup, "provider": "CPUExecutionProvider",
            "by_threads": [{k: v for k, v in e.items() if k != "detail"} for e in entries],
            "detail": decision["detail"],
            "input_shapes": {k: list(v.shape) for k, v in feed.items()}, **extra,
            **({"original_measured": SEGMENTED_LATENCY, "original_segments":
                decision.get("original_segments")} if budget is not None else {})}


SEGMENTED_LATENCY = (
    "segment by segment: the original's weights pass what the job may hold at once, so its "
    "time is the sum of its segments' (each loaded once, timed in rounds interleaved with the "
    "candidate, which runs whole; the placebo is a second session of each segment); kernels "
    "fused across a cut are not, so the original may read a little slower than whole")


def _segmented_latency(
    original_path: Path, budget: int, threads: int, candidate: Any, feed: Feed, *, runs: int,
    warmup: int, check_cancelled: Callable[[], None],
) -> dict[str, dict]:
    """``measure_latency``'s result for an original run segment by segment
    (``segments.SegmentedSession``): for each segment in turn, two sessions of it (before,
    placebo; one mapping of its weights) and the whole candidate are timed in ``runs``
    interleaved rounds on that segment's own inputs for ``feed``; round ``r``'s original time
    is the sum over segments of their round-``r`` times (likewise the placebo's), the
    candidate's the mean of its round-``r`` times."""
    from service.engine.segments import SegmentedSession

    original = SegmentedSession(Path(original_path), budget, threads)
    inputs = original.segment_feeds(feed)
    before = [0.0] * runs
    placebo = [0.0] * runs
    after: list[list[float]] = [[] for _ in range(runs)]
    bursts = {"before": 0, "placebo": 0, "after": 0}
    for k, seg_feed in enumerate(inputs):
        views = original.views(k)
        s1, s2 = original.session(k, threads, views), original.session(k, threads, views)
        lat = measure_latency({"before": s1, "after": candidate, "placebo": s2}, feed,
                              runs=runs, warmup=warmup, check_cancelled=check_cancelled,
                              feeds_by_key={"before": seg_feed, "placebo": seg_feed})
        del s1, s2, views
        for r in range(runs):
            before[r] += lat["before"]["samples_ms"][r]
            placebo[r] += lat["placebo"]["samples_ms"][r]
            after[r].append(lat["after"]["samples_ms"][r])
        for key in bursts:
            bursts[key] += lat[key]["runs_per_sample"]
    series = {"before": before, "placebo": placebo,
              "after": [statistics.fmean(a) for a in after]}
    out: dict[str, dict] = {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
            "runs": len(v), "runs_per_sample": max(1, bursts[k] // len(inputs)),
            "samples_ms": v}
        for k, v in series.items()}
    out["segments"] = {"count": len(original.segments), "budget_bytes": budget,  # type: ignore[assignment]
                       "largest_weight_bytes": original.peak_weight_bytes}
    return out


def decide(entries: list[dict], again: Callable[[], dict]) -> tuple[dict, str | None]:
    """The entry of ``entries`` (one per thread count, ``limits.latency_threads`` first, the
    target's last) that decides, and a note when it is not the target's own.

    The target's count decides, except where its measurement cannot stand for the target:
    - its placebo says the host was disturbed (``disturbed``): it is measured once more
      (``again``, which replaces it in ``entries``), and if still disturbed the first count
      decides;
    - the original ran slower there than at the first count: the host's cores were not free
      for it (or threads do not pay for this model), and a deployment would run the first.
    The first count decides only where its own placebo is quiet.
    """
    last = entries[-1]
    if disturbed(last["noise_band"]):
        first_band = last["noise_band"]
        entries[-1] = last = again()
        last["remeasured_after_placebo"] = first_band
        last["rounds"] *= 2
    first = entries[0]
    if len(entries) < 2 or disturbed(first["noise_band"]):
        return last, None
    n, k = last["threads"], first["threads"]
    why = None
    if disturbed(last["noise_band"]):
        why = (f"at {n} the original against itself differed by up to "
               f"{band_high(last['noise_band']):.2f}x twice (the host was busy), so that "
               "measurement cannot tell faster from slower")
    elif _original_ms(last) > _original_ms(first):
        why = (f"at {n} threads the original ran slower ({_original_ms(last):.3g} ms) than at "
               f"{k} ({_original_ms(first):.3g} ms): this host's cores were not free for it, or "
               f"threads do not pay for this model, and a deployment would run it at {k}")
    return (first, f"decided at {k} thread(s): {why}") if why else (last, None)


def _original_ms(entry: dict) -> float:
    """The original's median time in a latency entry (compare_latency's or the confirmation's)."""
    return float(entry["before_ms"] if "before_ms" in entry else entry["original_ms"])


# ---------------------------------------------------------------------------------------------
# Fidelity and accuracy


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def is_classifier_like(arrays: Sequence[np.ndarray]) -> bool:
    """2-D float output ``[batch, classes]`` with at least 2 classes."""
    a = arrays[0]
    return a.ndim == 2 and a.shape[-1] >= 2 and a.dtype.kind == "f"


def compare_output(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> dict:
    """Fidelity of one output over all evaluation feeds, accumulated feed by feed in float64
    (never one float64 copy of every feed's output: a language model's logits over a large
    vocabulary are hundreds of MB per feed)."""
    out: dict[str, Any] = {"cosine": None, "sqnr_db": None, "max_abs_error": None,
                           "top1_agreement": None,
                           "finite": all(bool(np.isfinite(np.asarray(c)).all()) for c in cand)}
    if len(ref) != len(cand) or any(np.asarray(a).size != np.asarray(b).size
                                    for a, b in zip(ref, cand, strict=False)):
        out["shape_mismatch"] = True
        return out
    if not out["finite"]:
        return out
    dot = sig = cand_sq = err = 0.0
    max_err = 0.0
    for a, b in zip(ref, cand, strict=True):
        r = np.asarray(a, np.float64).ravel()
        c = np.asarray(b, np.float64).ravel()
        d = r - c
        dot += float(np.dot(r, c))
        sig += float(np.dot(r, r))
        cand_sq += float(np.dot(c, c))
        err += float(np.dot(d, d))
        if d.size:
            max_err = max(max_err, float(np.max(np.abs(d))))
    nr, nc = math.sqrt(sig), math.sqrt(cand_sq)
    if nr == 0.0 and nc == 0.0:
        cos = 1.0
    elif nr == 0.0 or nc == 0.0:
        cos = 0.0
    else:
        cos = max(-1.0, min(1.0, dot / (nr * nc)))
    if err == 0.0:
        cos = 1.0  # identical outputs; the dot product above can round to 0.9999999999999999
    if err == 0.0:
        sqnr = SQNR_CAP_DB
    elif sig == 0.0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, 10.0 * math.log10(sig / err))
    out["cosine"] = _finite_or_none(cos)
    out["sqnr_db"] = _finite_or_none(sqnr)
    out["max_abs_error"] = _finite_or_none(max_err)
    if is_classifier_like(ref):
        agree = [np.argmax(a, axis=-1) == np.argmax(b, axis=-1) for a, b in
                 zip(ref, cand, strict=True)]
        out["top1_agreement"] = float(np.mean(np.concatenate(agree)))
    return out


def accuracy(outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    preds = np.concatenate([np.argmax(a, axis=-1).ravel() for a in outputs])
    truth = np.concatenate([np.asarray(lbl).ravel() for lbl in labels])
    return float(np.mean(preds == truth))


# ---------------------------------------------------------------------------------------------
# The whole comparison


def evaluate_candidate(
    original_path: Path,
    candidate_path: Path,
    feeds: Sequence[Feed],
    *,
    labels: Sequence[np.ndarray] | None = None,
    limits: EngineLimits | None = None,
    original_model: onnx.ModelProto | None = None,
    candidate_model: onnx.ModelProto | None = None,
    check_cancelled: Callable[[], None] = lambda: None,
    threads: Sequence[int] | None = None,
) -> dict:
    """Measure the candidate against the original; JSON-able result.

    Latency at each of ``threads`` (default ``[limits.latency_threads]``; see
    ``latency_thread_counts`` and ``compare_latency``).

    Keys: size {bytes_before, bytes_after, ratio}, params {before, after}, latency {before,
    after, speedup, threads, runs, ...}, fidelity {output: {...}}, min_cosine, accuracy
    {before, after, delta} or None, warnings.
    """
    limits = limits or EngineLimits()
    original_model = original_model or onnx.load(str(original_path))
    candidate_model = candidate_model or onnx.load(str(candidate_path))
    from service.engine.external import has_external, saved_bytes

    # A model saved with external data is its file and its data files.
    bytes_before = (saved_bytes(Path(original_path)) if has_external(original_model)
                    else Path(original_path).stat().st_size)
    bytes_after = (saved_bytes(Path(candidate_path)) if has_external(candidate_model)
                   else Path(candidate_path).stat().st_size)
    warnings: list[str] = []

    so = original_session(original_path, limits.latency_threads, limits)
    check_cancelled()
    ref = run_all(so, feeds)
    if hasattr(so, "segments"):
        from service.engine.segments import resident_note

        warnings.append(resident_note(so))
        del so
        so = None  # its segments are made again where they are timed
    sc = make_session(candidate_path, limits.latency_threads)
    cand = run_all(sc, feeds)
    fidelity: dict[str, dict] = {}
    for name in ref:
        if name not in cand:
            fidelity[name] = {"cosine": None, "sqnr_db": None, "max_abs_error": None,
                              "top1_agreement": None, "missing": True}
            warnings.append(f"output {name!r} is missing from the compressed model")
            continue
        fidelity[name] = compare_output(ref[name], cand[name])
        if not fidelity[name]["finite"]:
            warnings.append(f"output {name!r} of the compressed model contains NaN or Inf")
    cosines = [f["cosine"] for f in fidelity.values()]
    min_cosine = None if any(c is None for c in cosines) or not cosines else min(cosines)

    acc = None
    if labels is not None:
        cls_out = next((n for n in ref if is_classifier_like(ref[n])), None)
        if cls_out is None:
            warnings.append("labels were given but no output looks like class scores "
                            "([batch, classes]); accuracy not measured")
        else:
            before = accuracy(ref[cls_out], labels)
            after = accuracy(cand[cls_out], labels) if cls_out in cand else None
            acc = {"output": cls_out, "before": before, "after": after,
                   "delta": None if after is None else after - before, "samples": sum(
                       len(np.asarray(lbl).ravel()) for lbl in labels)}

    check_cancelled()
    del ref, cand  # every output of every feed: not held while latency is measured
    handed: list[Any] = [so, sc]
    del so, sc  # compare_latency lets them go once measured
    latency = compare_latency(original_path, candidate_path, feeds[0], runs=limits.latency_runs,
                              limits=limits, threads=threads, check_cancelled=check_cancelled,
                              sessions=handed)
    return {
        "size": {"bytes_before": bytes_before, "bytes_after": bytes_after,
                 "ratio": bytes_before / bytes_after if bytes_after else None},
        "params": {"before": parameter_count(original_model),
                   "after": parameter_count(candidate_model)},
        "latency": latency,
        "fidelity": fidelity,
        "min_cosine": min_cosine,
        "accuracy": acc,
        "warnings": warnings,
    }
