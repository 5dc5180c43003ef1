"""Confirming host latency: the original, a placebo second session of it and the best few
candidates re-measured head to head in one process, interleaved rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from service.engine.limits import EngineLimits
from service.engine.search.candidate import Candidate
from service.engine.search.score import SearchContext, score

CONFIRM_FINALISTS = 4


# A placebo farther off than this says the host was disturbed, not that slower is fine.
MAX_PLACEBO_BAND = 1.10
# One placebo pair can land closer than the run-to-run spread of a shared host: measured on a
# 2-core host, a weight-only model folded at load (the float graph again once loaded) came out
# at 0.984x against a placebo of 1.01. Below 3 %, "not slower" is not measurable here.
MIN_PLACEBO_BAND = 1.03


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
    from service.engine.evaluate import dataset_feeds, generate_feeds, make_session, measure_latency

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
    # A second session of the original is the placebo: how far two runs of the very same model
    # differ here bounds what "not slower" can claim.
    sessions = {"original": make_session(original_path, limits.latency_threads),
                "placebo": make_session(original_path, limits.latency_threads)}
    for cand in finalists:
        assert cand.result is not None  # finalists ran
        # measured as its report's speed assumes (weight-only int8: folded at load)
        sessions[cand.name] = make_session(cand.result.model_path, limits.latency_threads,
                                           cand.result.report["latency"].get("session_config"))
    measured = measure_latency(sessions, feed, runs=2 * limits.latency_runs,
                               warmup=limits.latency_warmup, check_cancelled=check_cancelled)
    base = measured["original"]["median_ms"]
    ctx.original_host_ms = base
    placebo_ms = measured["placebo"]["median_ms"]
    placebo = base / placebo_ms if placebo_ms > 0 else 1.0
    ctx.placebo_band = min(max(placebo, 1.0 / placebo, MIN_PLACEBO_BAND), MAX_PLACEBO_BAND)
    out = {"rounds": 2 * limits.latency_runs, "original_ms": round(base, 5),
           "placebo_speedup": round(placebo, 4), "noise_band": round(ctx.placebo_band, 4),
           "not_slower_means": f"speedup >= {1.0 / ctx.placebo_band:.3f} (1 / noise band)",
           "candidates": {}}
    for cand in finalists:
        ms = measured[cand.name]["median_ms"]
        m = cand.metrics
        m["host_latency_ms_first"], m["host_speedup_first"] = m["host_latency_ms"], m["host_speedup"]
        m["host_latency_ms"], m["host_latency_ms_original"] = ms, base
        m["host_speedup"] = base / ms if ms > 0 else None
        out["candidates"][cand.name] = {"ms": round(ms, 5), "speedup": round(base / ms, 4)
                                        if ms > 0 else None}
    return out


