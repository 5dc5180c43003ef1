"""What the search reports: the Pareto front, why the chosen candidate won, and the
``constraints_unsatisfiable`` error naming the closest candidate and every constraint missed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from service.engine import cost_model
from service.engine.devices import DeviceProfile
from service.engine.errors import EngineError
from service.engine.result import PipelineResult
from service.engine.search.candidate import Candidate, MixedPrecisionRecord
from service.engine.search.plan import WEIGHT_ONLY
from service.engine.search.score import DEFAULT_MIN_FIDELITY, SearchContext, latency_for_objective
from service.engine.wording import describe_speedup

log = logging.getLogger(__name__)


def pareto_front(cands: list[Candidate], ctx: SearchContext, original: dict) -> dict:
    """Plot-ready points (size MB, latency ms, fidelity) and the non-dominated set.

    A causal decoder's points also carry its language-model numbers (decode tokens/s, KL
    divergence, perplexity increase) and its front is non-dominated in size, decode tokens/s
    and KL divergence (``axes.front``); the original's decode tokens/s is the median of what
    the candidates' interleaved rounds measured for it."""
    if ctx.decoder:
        speeds = sorted(v for c in cands if c.status in ("ok", "rejected")
                        if (v := c.metrics.get("decode_tokens_per_s_original")) is not None)
        original = {**original, "kl_divergence": 0.0, "perplexity_increase": 0.0,
                    "decode_tokens_per_s": speeds[len(speeds) // 2] if speeds else None}
    points = [original]
    for cand in cands:
        if cand.status != "ok" and cand.status != "rejected":
            continue
        m = cand.metrics
        points.append({
            "candidate": cand.name,
            "size_mb": m["size_mb"],
            "latency_ms": latency_for_objective(cand, ctx),
            "host_latency_ms": m["host_latency_ms"],
            "target_latency_ms": m["target_latency_ms"],
            "fidelity": m["min_cosine"],
            "accuracy": m["accuracy_after"],
            "meets_constraints": not cand.violations,
            "formats": cand.formats,
        })
        if ctx.decoder:
            points[-1].update(kl_divergence=m.get("kl_divergence"),
                              perplexity_increase=m.get("perplexity_increase"),
                              decode_tokens_per_s=m.get("decode_tokens_per_s"))

    def key(p: dict) -> tuple[float, float, float]:
        if ctx.decoder:  # unmeasured counts as worst
            tokens, kld = p.get("decode_tokens_per_s"), p.get("kl_divergence")
            return (p["size_mb"], -(tokens if tokens is not None else 0.0),
                    kld if kld is not None else float("inf"))
        fid = p["fidelity"] if p["fidelity"] is not None else -1.0
        return (p["size_mb"], p["latency_ms"], -fid)

    front = []
    for p in points:
        kp = key(p)
        dominated = any(
            all(a <= b for a, b in zip(key(q), kp, strict=True)) and key(q) != kp
            for q in points if q is not p)
        p["on_front"] = not dominated
        if not dominated:
            front.append(p["candidate"])
    axes = {"x": "size_mb", "y": "latency_ms", "color": "fidelity"}
    if ctx.decoder:
        axes["front"] = "size_mb, decode_tokens_per_s, kl_divergence"
    return {
        "axes": axes,
        "latency_source": "host_measured" if ctx.measurable else "target_estimate",
        "points": points,
        "front": sorted(front, key=lambda n: next(p["size_mb"] for p in points if p["candidate"] == n)),
    }




def why_chosen(chosen: Candidate, cands: list[Candidate], ctx: SearchContext) -> str:
    m = chosen.metrics
    meeting = [c for c in cands if c.status == "ok" and not c.violations]
    lat_word = "measured on this host" if ctx.measurable else f"estimated on {ctx.profile.name}"
    parts = [
        f"{chosen.name} meets every constraint and is the best of {len(meeting)} that do on "
        f"the '{ctx.constraints.objective}' objective",
        f"{m['size_ratio']:.2f}x smaller" if m.get("size_ratio") else "",
        (f"{describe_speedup(m['host_speedup'], ctx.placebo_band)} {lat_word}"
         if ctx.measurable and m.get("host_speedup")
         else f"{describe_speedup(m['target_speedup'])} {lat_word}"
         if m.get("target_speedup") else ""),
        f"min cosine {m['min_cosine']:.4f}" if m.get("min_cosine") is not None else "",
    ]
    if m.get("accuracy_drop") is not None:
        parts.append(f"accuracy drop {m['accuracy_drop'] * 100:.2f} points")
    if chosen.name == WEIGHT_ONLY:
        parts.append("int8 weights, float compute: runs wherever ONNX runs")
    else:
        parts.append(f"formats {', '.join(chosen.formats)} (fast on {ctx.profile.name})")
    return "; ".join(p for p in parts if p)


# Words in a library's message that say the inputs' shapes did not fit the graph.
_SHAPE_WORDS = ("dimension", "shape", "broadcast", "rank", "pad", "exceeds", "mismatch")


def failures_message(cands: list[Candidate], ctx: SearchContext) -> str:
    """Why no candidate could be built, each distinct reason once with the candidates it
    stopped, the input shapes they were evaluated on, and what the user can give when the
    reasons are about shapes (input shapes and values, or a dataset)."""
    groups: dict[str, list[str]] = {}
    for cand in cands:
        error = cand.error or {}
        groups.setdefault(str(error.get("message") or error.get("code") or "failed"),
                          []).append(cand.name)
    reasons = "; ".join(f"{', '.join(names)}: {message}" for message, names in groups.items())
    shapes = ctx.inputs.shapes() if ctx.inputs is not None else ctx.input_shapes
    text = f"no candidate could be built for {ctx.profile.name}: {reasons[:600]}"
    if shapes:
        text += " (evaluated on inputs " + ", ".join(
            f"{name} {'x'.join(str(d) for d in dims) or 'scalar'}"
            for name, dims in shapes.items()) + ")"
    if ctx.inputs is not None and any(w in reasons.lower() for w in _SHAPE_WORDS):
        text += ("; if these shapes are not what the model takes, give them with the job's "
                 "inputs (edgepress --input-shape name=1x3x640x640, --input-value name=16000) "
                 "or upload a dataset of real samples")
    return text


def fail_unsatisfiable(cands: list[Candidate], ctx: SearchContext, auto_section: dict) -> None:
    ran = [c for c in cands if c.status == "ok"]
    if not ran:
        failures = [{"candidate": c.name, "error": c.error} for c in cands]
        raise EngineError(
            "constraints_unsatisfiable", failures_message(cands, ctx),
            {"closest": None, "missed": [], "candidates": failures, "auto": auto_section})

    def distance(c: Candidate) -> float:
        return sum((v.get("missed_by_pct") or 100.0) for v in c.violations)

    closest = min(ran, key=distance)
    missed = closest.violations
    text = ", ".join(
        f"{v['constraint']} {v['value']} vs {v['limit']}"
        + (f" (missed by {v['missed_by']})" if v.get("missed_by") is not None else "")
        for v in missed)
    hint = ""
    if all(v["constraint"].startswith("not_slower") for v in missed):
        hint = ("; every candidate that fits is slower than the original here: objective "
                "'size' accepts a slower model")
    raise EngineError(
        "constraints_unsatisfiable",
        f"no candidate meets the constraints on {ctx.profile.name}; closest is "
        f"{closest.name}: {text}{hint}",
        {"closest": {"candidate": closest.name, "recipe": closest.recipe,
                     "metrics": {k: v for k, v in closest.metrics.items() if k != "warnings"}},
         "missed": missed,
         "candidates": [{"candidate": c.name, "status": c.status, "error": c.error,
                         "violations": c.violations} for c in cands],
         "auto": auto_section})


def host_check(samples: list[tuple[Any, float, str]], host: DeviceProfile,
               ctx: SearchContext) -> dict[str, Any]:
    """The cost model's own host estimate (no per-job calibration: the stored fit's constants
    where they apply, ``cost_model.constants_for``) beside each measured latency, with the
    error the fit states for itself."""
    points = []
    constants, stated = "defaults", None
    for path, measured, label in samples:
        est = cost_model.estimate(path, host, input_shapes=ctx.input_shapes)
        constants, stated = est.constants, est.fit_error_pct
        # Four significant figures (a tiny model runs in microseconds), and the error of the
        # figures shown, so that a reader recomputing it gets the same.
        shown_est, shown_measured = float(f"{est.latency_ms:.4g}"), float(f"{measured:.4g}")
        points.append({"model": label, "estimated_ms": shown_est, "measured_ms": shown_measured,
                       "error_pct": round(100.0 * (shown_est - shown_measured)
                                          / shown_measured, 1)})
    return {"constants": constants, "stated_error_pct": stated, "points": points}


def auto_section(
    cands: list[Candidate], ctx: SearchContext, host: DeviceProfile, original_path: Path,
    family: dict, skipped: list[dict], device_arg: dict, *, evaluation: dict,
    stop_reason: str | None,
    mixed_precision: list[MixedPrecisionRecord], workers: int, confirmation: dict | None,
    seconds: float,
) -> dict[str, Any]:
    """The report's ``auto`` section (without ``chosen``: ``chosen_result`` adds it)."""
    cons, profile = ctx.constraints, ctx.profile
    # Host calibration of the cost model: predicted vs measured latency on this machine.
    host_cal = None
    ok = [c for c in cands if c.status == "ok"]
    if ok and ctx.original_host_ms:
        samples: list[tuple[Any, float, str]] = [
            (original_path, ctx.original_host_ms, "original")]
        samples += [(c.result.model_path, c.metrics["host_latency_ms"], c.name)
                    for c in ok if c.result is not None]
        try:
            host_cal = cost_model.calibrate_host(samples, host,
                                                 input_shapes=ctx.input_shapes).to_dict()
            host_cal["uncalibrated"] = host_check(samples, host, ctx)
        except Exception:  # calibration is evidence, never a reason to fail the job
            log.exception("host calibration failed")

    original_point = {
        "candidate": "original", "size_mb": round((ctx.original_bytes or 0) / 1e6, 4),
        "latency_ms": (ctx.original_host_ms if ctx.measurable else
                       (ctx.original_estimate.latency_ms if ctx.original_estimate else None)),
        "host_latency_ms": ctx.original_host_ms,
        "target_latency_ms": ctx.original_estimate.latency_ms if ctx.original_estimate else None,
        "fidelity": 1.0, "accuracy": ok[0].metrics["accuracy_before"] if ok else None,
        "meets_constraints": None, "formats": ["fp32"],
    }
    front = pareto_front(cands, ctx, original_point) if ok else None
    effective = cons.model_dump()
    if cons.min_fidelity is None and cons.max_accuracy_drop is None:
        effective["min_fidelity"] = DEFAULT_MIN_FIDELITY
    section: dict[str, Any] = {
        "device": {k: device_arg[k] for k in ("name", "title", "kind", "execution_providers",
                                              "precisions", "quant_formats", "static_shapes")},
        "target_measured": ctx.measurable,
        "constraints": effective,
        "objective": cons.objective,
        "model": family,
        "candidates": [c.to_dict() for c in cands],
        "skipped_formats": skipped,
        "early_stop": {"stopped": stop_reason is not None, "reason": stop_reason},
        "mixed_precision": mixed_precision,
        "pareto_front": front,
        "cost_model": {
            "target_original": ctx.original_estimate.to_dict() if ctx.original_estimate else None,
            "host_calibration": host_cal,
        },
        "workers": workers,
        "latency_confirmation": confirmation,
        "evaluation": evaluation,
        "search_seconds": round(seconds, 2),
    }
    if not ctx.measurable:
        section["note"] = (
            f"{profile.title} cannot be measured on this host: target latency, memory and "
            "energy are cost-model estimates; host latency is shown for reference")
    return section


def chosen_result(
    chosen: Candidate, cands: list[Candidate], ctx: SearchContext, section: dict[str, Any],
    confirmation: dict | None, workdir: Path, *, has_holdout: bool,
) -> PipelineResult:
    """The job's result: the chosen candidate's artifacts copied to ``workdir/output`` (the
    others' scratch space freed), its report with the ``auto`` section and the summary's
    numbers from what the choice rested on (held-out split, head-to-head latency)."""
    profile = ctx.profile
    result = chosen.result
    assert result is not None
    out_dir = workdir / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Path] = {}
    for name, path in result.artifacts.items():
        dest = out_dir / name
        shutil.copyfile(path, dest)
        artifacts[name] = dest
    for cand in cands:  # free the scratch space of the others
        if cand is not chosen and cand.result is not None:
            shutil.rmtree(cand.result.model_path.parent.parent, ignore_errors=True)
    chosen_est = cost_model.estimate(artifacts["model.onnx"], profile,
                                     input_shapes=ctx.input_shapes)
    front = section["pareto_front"]
    if front is not None:
        for point in front["points"]:
            point["chosen"] = point["candidate"] == chosen.name
    section["chosen"] = {
        "candidate": chosen.name, "recipe": chosen.recipe, "formats": chosen.formats,
        "why": why_chosen(chosen, cands, ctx),
        "target_estimate": chosen_est.to_dict(),
    }
    summary = result.summary.copy()
    if has_holdout:
        # constraints were judged on the held-out split: the summary shows those numbers
        m = chosen.metrics
        summary["accuracy_before"] = m["accuracy_before"]
        summary["accuracy_after"] = m["accuracy_after"]
        summary["min_cosine"] = m["min_cosine"]
        summary["fidelity"] = m["holdout_fidelity"]
        summary["eval_inputs"] = "dataset_holdout"
    if confirmation is not None and chosen.name in confirmation["candidates"]:
        # the head-to-head numbers the choice rests on (report["latency"] keeps the first)
        summary["latency_ms_before"] = confirmation["original_ms"]
        summary["latency_ms_after"] = confirmation["candidates"][chosen.name]["ms"]
        summary["speedup"] = confirmation["candidates"][chosen.name]["speedup"]
        by = confirmation["by_threads"]
        one = next((e for e in by if e["threads"] == 1), None)
        summary["latency_threads"] = [e["threads"] for e in by]
        summary["speedup_1_thread"] = (one["candidates"][chosen.name]["speedup"]
                                       if one else None)
        summary["speedup_threads"] = by[-1]["candidates"][chosen.name]["speedup"]
        band = confirmation["noise_band"]
        summary["placebo_band"] = [round(1.0 / band, 4), band]
    summary["auto"] = {"candidate": chosen.name, "device": profile.name,
                       "target_latency_ms": chosen.metrics["target_latency_ms"],
                       "target_speedup": chosen.metrics["target_speedup"]}
    warnings = list(summary.get("warnings", []))
    if not ctx.measurable:
        warnings.append(f"latency on {profile.name} is estimated by the cost model, not measured")
    if confirmation is not None and confirmation.get("decision_note"):
        warnings.append(confirmation["decision_note"])
    summary["warnings"] = warnings
    report = dict(result.report)
    if ctx.inputs is not None:  # the candidates were given what the search resolved
        report["eval_inputs"] = dict(report.get("eval_inputs") or {},
                                     resolution=ctx.inputs.record)
    report["recipe"] = chosen.recipe
    report["mode"] = "auto"
    report["auto"] = section
    report["summary"] = summary
    report["warnings"] = warnings
    report["device"] = profile.model_dump(mode="json")
    return PipelineResult(model_path=artifacts["model.onnx"], report=report, summary=summary,
                          artifacts=artifacts)
