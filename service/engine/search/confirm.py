"""Confirming host latency: the original, a placebo second session of it and the best few
candidates re-measured head to head in one process, interleaved rounds, at 1 thread and at the
target's thread count (``evaluate.latency_thread_counts``; the last count decides).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from service.engine.limits import EngineLimits
from service.engine.search.candidate import Candidate
from service.engine.search.score import SearchContext, gate_band, score
from service.engine.wording import noise_band

CONFIRM_FINALISTS = 4


def confirm_latency(
    cands: list[Candidate], ctx: SearchContext, original_path: Path, model: onnx.ModelProto,
    dataset: dict | None, labels: Any, limits: EngineLimits,
    check_cancelled: Callable[[], None],
) -> dict | None:
    """Re-measure the original and the best few candidates together, interleaved.

    Each candidate's first measurement ran in its own pipeline (possibly while others ran in
    parallel); comparing finalists needs one session with all of them. Updates the candidates'
    ``host_latency_ms``/``host_speedup`` (the first numbers stay as ``*_first``).
    """
    from service.engine.evaluate import (
        dataset_feeds,
        decide,
        generate_feeds,
        latency_thread_counts,
        make_session,
        measure_latency,
        paired_speedup,
        rounds_per_count,
    )

    finalists = sorted(
        (c for c in cands if c.status == "ok" and all(
            v["constraint"] == "not_slower_on_host" for v in c.violations)),
        key=lambda c: score(c, ctx))[:CONFIRM_FINALISTS]
    if not finalists:
        return None
    if dataset is not None:
        feed = dataset_feeds(model, dataset, labels, 1)[0][0]
    else:
        feed = generate_feeds(model, 1, plan=ctx.inputs)[0]
    # At 1 thread and at the target's own thread count (the decision's, last), the budget of
    # rounds split between them. A second session of the original is the placebo: how far two
    # runs of the very same model differ here bounds what "not slower" can claim.
    counts = latency_thread_counts(limits, ctx.profile)
    rounds = rounds_per_count(2 * limits.latency_runs, len(counts))

    def measure(count: int) -> dict[str, Any]:
        sessions = {"original": make_session(original_path, count),
                    "placebo": make_session(original_path, count)}
        for cand in finalists:
            assert cand.result is not None  # finalists ran
            # measured as its report's speed assumes (weight-only int8: folded at load)
            sessions[cand.name] = make_session(cand.result.model_path, count,
                                               cand.result.report["latency"].get("session_config"))
        measured = measure_latency(sessions, feed, runs=rounds,
                                   warmup=limits.latency_warmup, check_cancelled=check_cancelled)
        base = measured["original"]["samples_ms"]
        # paired medians over the interleaved rounds, as compare_latency (recipe jobs) does
        placebo, _ = paired_speedup(base, measured["placebo"]["samples_ms"])
        band = noise_band(placebo)
        return {
            "threads": count, "rounds": rounds,
            "original_ms": round(measured["original"]["median_ms"], 5),
            "placebo_speedup": round(placebo, 4),
            "noise_band": round(band[1], 4) if band else 1.0,
            "candidates": {c.name: {
                "ms": round(measured[c.name]["median_ms"], 5),
                "speedup": round(paired_speedup(base, measured[c.name]["samples_ms"])[0], 4)}
                for c in finalists}}

    entries = [measure(count) for count in counts]
    decision, note = decide(entries, lambda: measure(counts[-1]))
    band = float(decision["noise_band"])
    ctx.original_host_ms = decision["original_ms"]
    # The gate allows the measured band, and never less than MIN_PLACEBO_BAND (the report keeps
    # the measured band; "not_slower_means" says what the gate used).
    ctx.placebo_band = gate_band(band)
    out = {"rounds": sum(e["rounds"] for e in entries), "threads": decision["threads"],
           "thread_counts": counts, "original_ms": decision["original_ms"],
           "placebo_speedup": decision["placebo_speedup"], "noise_band": round(band, 4),
           "not_slower_means": f"speedup >= {1.0 / ctx.placebo_band:.3f} (1 / noise band)",
           "candidates": decision["candidates"], "by_threads": entries}
    if note:
        out["decision_note"] = note
    for cand in finalists:
        got = decision["candidates"][cand.name]
        m = cand.metrics
        m["host_latency_ms_first"], m["host_speedup_first"] = m["host_latency_ms"], m["host_speedup"]
        m["host_latency_ms"], m["host_latency_ms_original"] = got["ms"], decision["original_ms"]
        m["host_speedup"] = got["speedup"] if got["ms"] > 0 else None
    return out
