"""A recipe job: prepare the model, apply the recipe's steps, evaluate, judge, report.

``run_recipe`` is what ``compress(model, [steps...])`` runs, and what the auto search runs for
each candidate. Preparing and applying steps are ``service.engine.pipeline``'s (shared with the
search); this module evaluates the result against the original and decides the outcome. Which
passes only quantize is the passes' own declaration (``Pass.quantizes``).

Outcome rules:
- a compressed model that is neither smaller (<= 98 % of the original bytes) nor faster
  (speedup >= 1.05 on this host, then confirmed over 30+ interleaved rounds: >= 1.10 times
  what a placebo run of the original against itself shows, in >= 75 % of the rounds) fails
  with ``no_effect``: a job never "succeeds" with a bigger or unchanged file;
- a compressed model slower than the original on this host (speedup < 0.95) succeeds with a
  warning saying how much slower;
- ``model.onnx.zst`` is added when zstd shrinks the model below 90 % of its raw size (sparse
  or clustered weights).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import onnx

from service.engine.dataset import load_dataset, samples_layout, split_for_evaluation
from service.engine.decoder import decoder_spec
from service.engine.errors import EngineError
from service.engine.external import float_weights_on_disk, saved_bytes
from service.engine.ingest import fit_ir_version
from service.engine.inputs import InputPlan, resolve_inputs
from service.engine.limits import EngineLimits
from service.engine.lm import lm_evaluation, lm_summary
from service.engine.normalise import normalise
from service.engine.pipeline import (
    apply_steps,
    ingest,
    load_session,
    refuse_requantizing,
    save,
    scrub,
)
from service.engine.registry import SMALLER_RATIO, Pass, PassContext, parse_recipe
from service.engine.result import OutputFidelity, PipelineResult, Summary, engine_version
from service.engine.wording import describe_speedup

log = logging.getLogger(__name__)

FASTER_SPEEDUP = 1.05  # speedup >= 1.05 counts as faster
FASTER_WIN_FRACTION = 0.75  # ... in at least 75 % of the interleaved rounds (speed-only wins)
SPEED_ONLY_SPEEDUP = 1.10  # a result that is not smaller must be this much faster (x placebo)
SLOWER_SPEEDUP = 0.95  # below this, the result is reported as slower than the original
ZSTD_KEEP_RATIO = 0.90
ZSTD_LEVEL = 9


def run_recipe(
    model_path: Path,
    recipe: list[dict],
    workdir: Path,
    *,
    dataset_path: Path | None = None,
    device: dict | str | None = None,
    progress: Callable[[str, float], None] = lambda stage, fraction: None,
    check_cancelled: Callable[[], None] = lambda: None,
    resolve_model: Callable[[str], Path] | None = None,
    limits: EngineLimits | None = None,
    artifact_ready: Callable[[str, Path], None] | None = None,
    inputs: dict[str, Any] | None = None,
    eval_dataset_path: Path | None = None,
) -> PipelineResult:
    """Compress ``model_path`` with ``recipe`` (a list of ``{"pass": name, **config}`` steps),
    working under ``workdir``; returns the compressed model and its report.

    Evaluation never sees a calibration or training sample: the dataset is split (every third
    sample held out, ``dataset.split_for_evaluation``; counts in ``report["evaluation"]``), or,
    given ``eval_dataset_path``, the passes use the whole dataset and evaluation that one.

    ``artifact_ready(name, path)`` is told of an artifact as soon as its file is final (the
    compressed model, before it is evaluated), so a caller can start storing it; the job may
    still fail after that (the caller then discards it).

    ``inputs`` (the job's, ``{name: {"shape": [...], "value": v}}``, see
    ``service.engine.inputs``) fixes shapes and values of generated inputs; without a dataset,
    the rest is resolved by probing the original model (``report["eval_inputs"]["resolution"]``
    says what was chosen and why). With a dataset, the dataset gives the inputs.

    Progress stages: "ingest", "normalise", "pass:<name>" per step, "evaluate", "report".
    Raises ``EngineError`` (codes in ``service.engine.errors``); a library exception inside a
    pass becomes ``pass_failed`` naming the pass.
    """
    limits = limits or EngineLimits()
    workdir = Path(workdir)
    steps = parse_recipe(recipe)  # invalid_recipe / unknown_pass before any heavy work
    profile = None
    if device is not None:
        from service.engine.devices import parse_device

        profile = parse_device(device)  # invalid_device / unknown_device before heavy work
    warnings: list[str] = []

    # ---- ingest
    progress("ingest", 0.0)
    ingested, given = ingest(Path(model_path), workdir / "input", limits, inputs)
    description = ingested.description
    check_cancelled()
    dataset = labels = eval_set = eval_labels = None
    evaluation_split: dict[str, Any] = {"disjoint": True, "rule": "no dataset: evaluated on "
                                        "generated inputs (seed 0), calibration generates its "
                                        "own (seed 1)"}
    if dataset_path is not None:
        dataset, labels = load_dataset(Path(dataset_path), ingested.model, limits)
        if eval_dataset_path is not None:
            eval_set, eval_labels = load_dataset(Path(eval_dataset_path), ingested.model, limits)
            evaluation_split = {
                "disjoint": True, "rule": "evaluation samples given apart from the calibration "
                "samples", "calibration_samples": int(next(iter(dataset.values())).shape[0]),
                "evaluation_samples": int(next(iter(eval_set.values())).shape[0])}
        else:
            dataset, labels, eval_set, eval_labels, evaluation_split = split_for_evaluation(
                ingested.model, dataset, labels)
            if eval_set is None:
                eval_set, eval_labels = dataset, labels
                warnings.append("the dataset holds a single sample: it was evaluated on the "
                                "sample it was calibrated on (upload more samples)")
    if description["already_quantized"] and all(cls.quantizes for cls, _ in steps):
        refuse_requantizing(description, "quantizing it again would not make it smaller. Send "
                            "the float model, or use a recipe with non-quantizing passes (e.g. "
                            "graph_optimize)")
    ir_note = fit_ir_version(ingested.model)
    if ir_note:
        warnings.append(ir_note)
    original_path = workdir / "input" / "original.onnx"
    save(ingested.model, original_path)
    from service.engine.evaluate import (
        NO_PREPACKING,
        compare_latency,
        dataset_feeds,
        evaluate_candidate,
        generate_feeds,
        latency_thread_counts,
    )

    session = load_session(original_path, limits, workdir)
    plan: InputPlan | None = None
    if dataset is not None:
        feeds, label_chunks = dataset_feeds(
            ingested.model, eval_set if eval_set is not None else dataset, eval_labels,
            limits.eval_samples)
        eval_source = "dataset"
        if not feeds:
            raise EngineError("invalid_dataset", "the dataset holds fewer samples than one "
                              "batch of the model")
        _check_runs(session, feeds[0], workdir)
        resolution: dict[str, Any] = {"source": "dataset"}
        if given:
            warnings.append("the job's inputs were not used: the dataset gives the inputs")
    else:
        progress("ingest", 0.02)
        plan = resolve_inputs(ingested.model, session, given,
                              scrub=lambda text: scrub(text, workdir),
                              check_cancelled=check_cancelled)
        feeds, label_chunks, eval_source = (
            generate_feeds(ingested.model, limits.eval_samples, plan=plan), None, "generated")
        resolution = plan.record
    del session

    # ---- normalise
    progress("normalise", 0.05)
    check_cancelled()
    model, normalisation = normalise(ingested.model, limits)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    # The baseline for "did the recipe compress it": normalisation alone (dropping dead nodes,
    # debug info) shrinks some files, and that must not count as the recipe's doing.
    baseline_path = workdir / "input" / "normalised.onnx"
    save(model, baseline_path)

    # ---- passes
    span = 0.65 / len(steps)

    def context(index: int, cls: type[Pass[Any]], step_dir: Path) -> PassContext:
        stage, base = f"pass:{cls.name}", 0.1 + index * span
        progress(stage, base)
        original_copy = onnx.ModelProto()
        original_copy.CopyFrom(reference)
        return PassContext(
            workdir=step_dir, dataset=dataset, labels=labels, original=original_copy,
            progress=_step_progress(progress, stage, base, span),
            check_cancelled=check_cancelled, resolve_model=resolve_model, inputs=plan,
            target=profile,
        )

    model, applied = apply_steps(model, steps, workdir / "passes", context, check_cancelled,
                                 scrub_root=workdir)
    pass_reports: list[dict] = []
    calibration: dict | None = None
    session_config: dict[str, str] | None = None
    for step in applied:
        notes = step.notes
        warnings.extend(f"{step.name}: {w}" for w in notes.get("warnings", []))
        encoding = notes.get("encoding")
        if isinstance(encoding, dict) and encoding.get("warning"):
            warnings.append(str(encoding["warning"]))
        if isinstance(notes.get("session_config"), dict):  # a load setting changes its speed
            session_config = {**(session_config or {}), **notes["session_config"]}
        elif notes.get("load_hint"):  # how to load the result for the speed it can have
            warnings.append(f"{step.name}: {notes['load_hint']}")
        if "calibration" in notes and isinstance(notes["calibration"], dict):
            calibration = notes["calibration"]
        pass_reports.append({"pass": step.name, "config": step.config.model_dump(mode="json"),
                             "seconds": round(step.seconds, 3), "notes": notes})

    if model.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    ):
        raise EngineError("no_effect", "the recipe left the model unchanged",
                          {"passes": [p["pass"] for p in pass_reports]})

    # ---- evaluate
    check_cancelled()
    progress("evaluate", 0.75)
    output_path = workdir / "output" / "model.onnx"
    output_files = save(model, output_path)
    # Weights kept in external data: the output is model.onnx and model.onnx.data beside it.
    external = bool(ingested.external_bytes)
    data_path = output_path.with_name(output_path.name + ".data")
    thread_counts = latency_thread_counts(limits, profile)
    if artifact_ready is not None:
        artifact_ready("model.onnx", output_path)  # not written again from here on
        if data_path in output_files:
            artifact_ready("model.onnx.data", data_path)
    try:
        evaluation = evaluate_candidate(
            original_path, output_path, feeds,
            labels=label_chunks if decoder_spec(ingested.model) is None else None,
            limits=limits, original_model=ingested.model, candidate_model=model,
            check_cancelled=check_cancelled, threads=thread_counts,
        )
        lm = lm_evaluation(original_path, output_path, ingested.model, feeds,
                           eval_set if dataset is not None else None, eval_labels,
                           threads=limits.latency_threads, check_cancelled=check_cancelled,
                           limits=limits)
    except EngineError:
        raise
    except Exception as exc:
        log.exception("evaluating the compressed model failed")
        last = steps[-1][0].name
        raise EngineError(
            "pass_failed",
            "the compressed model does not run in ONNX Runtime: "
            f"{type(exc).__name__}: {scrub(str(exc), workdir)}",
            {"pass": last},
        ) from None
    warnings.extend(evaluation["warnings"])
    if session_config:
        _measure_session_settings(evaluation, session_config, original_path, output_path,
                                  feeds[0], limits, thread_counts, check_cancelled, warnings)

    size, latency = evaluation["size"], evaluation["latency"]
    # Sparse or clustered weights shrink only under compression: the zstd artifact counts.
    # (Not for weights kept in external data: streamed int4/int8 codes are what shrinks, and
    # zstd over gigabytes of them would cost minutes for a few percent.)
    zst = _maybe_zstd(output_path) if not external else None
    size["bytes_after_zstd"] = zst.stat().st_size if zst is not None else None
    stored = min(size["bytes_after"], size["bytes_after_zstd"] or size["bytes_after"])
    # Like for like: zstd also shrinks the float original a little (7-10 %), so a result
    # counts as smaller only against the original under the same treatment.
    if external:
        size["bytes_before_zstd"] = None
        baseline = min(size["bytes_before"], saved_bytes(baseline_path))
    else:
        size["bytes_before_zstd"] = _zstd_size(original_path)
        baseline = min(size["bytes_before"], size["bytes_before_zstd"],
                       baseline_path.stat().st_size, _zstd_size(baseline_path))
    smaller = stored <= SMALLER_RATIO * baseline
    # Every speed decision is judged against the placebo's noise band (the original against a
    # second session of itself, measured in the same rounds): "faster" and "slower" only
    # outside it. The decision's number is the target's thread count (the last measured).
    speedup = latency["speedup"] or 0.0
    low, high = latency["noise_band"] or (1.0, 1.0)
    faster = speedup >= max(FASTER_SPEEDUP, high)
    if not smaller and faster:
        # Speed alone decides: confirm with more rounds, and require that most rounds agree, so
        # that noise on a shared host never passes an unchanged model off as faster. Two
        # sessions of the very same model can differ steadily by 5-7 % (where their buffers
        # landed in memory): the placebo measures that here, and the candidate must beat it
        # by a clear margin. Measured as the reported speed assumes (its session config).
        runs = max(30, 3 * limits.latency_runs)
        kept = {k: latency[k] for k in ("session_config", "session_settings") if k in latency}
        latency = {**compare_latency(original_path, output_path, feeds[0], runs=runs,
                                     limits=limits, threads=thread_counts,
                                     check_cancelled=check_cancelled,
                                     candidate_config=latency.get("session_config")), **kept}
        low, high = latency["noise_band"] or (1.0, 1.0)
        latency["confirmed"] = True
        latency["required_speedup"] = round(SPEED_ONLY_SPEEDUP * high, 3)
        evaluation["latency"] = latency
        speedup = latency["speedup"] or 0.0
        faster = (speedup >= latency["required_speedup"]
                  and latency["win_fraction"] >= FASTER_WIN_FRACTION)
    if not smaller and not faster:
        if zst is not None:
            zst.unlink()
        raise EngineError(
            "no_effect",
            f"the recipe did not compress the model: {stored} bytes vs "
            f"{size['bytes_before']} before, {speedup:.2f}x the speed on this host",
            {"bytes_before": size["bytes_before"], "bytes_after": size["bytes_after"],
             "bytes_after_zstd": size["bytes_after_zstd"], "speedup": round(speedup, 3),
             "noise_band": latency["noise_band"]},
        )
    if latency.get("decision_note"):
        warnings.append(latency["decision_note"])
    if float_weights_on_disk(original_path) and not float_weights_on_disk(output_path):
        latency["original_session_config"] = dict([NO_PREPACKING])
        warnings.append("the original was timed without weight prepacking (its float weights "
                        "stay in external data, and prepacking would copy them all into "
                        "memory): the speedup may favour the compressed model")
    if speedup < min(SLOWER_SPEEDUP, low):
        warnings.append(f"compressed model is {describe_speedup(speedup, (low, high))} than "
                        f"the original on this host ({latency['threads']} thread(s))")

    target = _target_estimates(profile, original_path, output_path, feeds[0], warnings)
    measurement = measurement_note(profile)
    if not measurement["host_is_target"]:
        warnings.append(measurement["note"])
    check_cancelled()
    try:  # per-op-type kernel time before/after, for the report's chart
        from service.engine.report_html import op_latency_section
        from service.engine.segments import segment_budget

        latency["by_op_type"] = op_latency_section(
            original_path, output_path, feeds[0], runs=min(10, limits.latency_runs),
            threads=limits.latency_threads, original_note=(
                "not profiled: the original's weights pass what the job may hold at once"
                if segment_budget(original_path, limits) is not None else None),
        )
    except Exception as exc:  # profiling is evidence, not the job: say why it is missing
        latency["by_op_type"] = {"error": f"profiling failed: {type(exc).__name__}"}

    # ---- report
    progress("report", 0.95)
    artifacts = {"model.onnx": output_path}
    if data_path in output_files:
        artifacts["model.onnx.data"] = data_path
    if zst is not None:
        artifacts["model.onnx.zst"] = zst
    fidelity = evaluation["fidelity"]
    acc = evaluation["accuracy"]
    first_input = next(iter(feeds[0]))
    eval_samples = (len(feeds) if dataset is not None and eval_set is not None
                    and samples_layout(ingested.model, eval_set)
                    else sum(int(f[first_input].shape[0]) if f[first_input].ndim else 1
                             for f in feeds))
    evaluation_split["evaluated_samples"] = eval_samples
    if eval_source == "generated":
        warnings.append("fidelity was measured on generated inputs, not real data: it says "
                        "little about accuracy on real inputs (upload a dataset)")
    threads_summary = latency_summary(latency)
    summary: Summary = {
        "bytes_before": size["bytes_before"],
        "bytes_after": size["bytes_after"],
        "size_ratio": size["ratio"],
        "bytes_after_zstd": size["bytes_after_zstd"],
        "params_before": evaluation["params"]["before"],
        "params_after": evaluation["params"]["after"],
        "latency_ms_before": latency["before_ms"],
        "latency_ms_after": latency["after_ms"],
        "speedup": latency["speedup"],
        "latency_threads": threads_summary["latency_threads"],
        "speedup_1_thread": threads_summary["speedup_1_thread"],
        "speedup_threads": threads_summary["speedup_threads"],
        "placebo_band": threads_summary["placebo_band"],
        "fidelity": {
            name: OutputFidelity(cosine=f.get("cosine"), sqnr_db=f.get("sqnr_db"),
                                 max_abs_error=f.get("max_abs_error"),
                                 top1_agreement=f.get("top1_agreement"))
            for name, f in fidelity.items()
        },
        "min_cosine": evaluation["min_cosine"],
        "eval_inputs": eval_source,
        "eval_samples": eval_samples,
        "measured_on": measurement["host"],
        "accuracy_before": acc["before"] if acc else None,
        "accuracy_after": acc["after"] if acc else None,
        "already_quantized": description["already_quantized"],
        "warnings": warnings,
    }
    if lm is not None:
        summary["lm"] = lm_summary(lm)
        if lm.get("error"):
            warnings.append(str(lm["error"]))
    if latency.get("session_config"):
        summary["session_config"] = latency["session_config"]
    if calibration is None and any(cls.calibrates_with(config) for cls, config in steps):
        calibration = {"source": "dataset" if dataset is not None else "generated",
                       "samples": None}
    report = {
        "engine_version": engine_version(),
        "input": description,
        "normalisation": normalisation,
        "recipe": [dict(step) for step in recipe],
        "passes": pass_reports,
        "device": profile.model_dump(mode="json") if profile is not None else {
            "name": "host", "note": "latency measured on the worker's CPU"},
        "target": target,
        "measurement": measurement,
        "size": size,
        "latency": latency,
        "fidelity": fidelity,
        "accuracy": acc,
        "lm": lm,
        "calibration": calibration,
        "evaluation": evaluation_split,
        "eval_inputs": {"source": eval_source, "samples": len(feeds),
                        "shapes": {k: list(v.shape) for k, v in feeds[0].items()},
                        "resolution": resolution},
        "artifacts": {name: p.stat().st_size for name, p in artifacts.items()},
        "summary": summary,
        "warnings": warnings,
    }
    progress("report", 1.0)
    return PipelineResult(model_path=output_path, report=report, summary=summary,
                          artifacts=artifacts)


def latency_summary(latency: dict[str, Any]) -> dict[str, Any]:
    """The summary's per-thread-count latency keys, from ``compare_latency``'s result:
    ``latency_threads`` (the counts measured, the decision's last), ``speedup_1_thread``,
    ``speedup_threads`` (at the target's count; equal to ``speedup``) and ``placebo_band``
    (the decision's noise band, [low, high])."""
    by = latency.get("by_threads") or []
    one = next((e for e in by if e["threads"] == 1), None)
    return {"latency_threads": [e["threads"] for e in by],
            "speedup_1_thread": one["speedup"] if one else None,
            "speedup_threads": by[-1]["speedup"] if by else None,
            "placebo_band": latency.get("noise_band")}


def _measure_session_settings(
    evaluation: dict, config: dict[str, str], original_path: Path, output_path: Path,
    feed: dict, limits: EngineLimits, threads: list[int], check_cancelled: Callable[[], None],
    warnings: list[str],
) -> None:
    """Measure the result again in a session with ``config`` (a pass's load setting, e.g.
    weight-only int8's ``session.disable_quant_qdq=1``) and report the faster of the two.

    ``latency["session_settings"]`` holds both measurements; ``latency["session_config"]`` is
    set (and the summary says so) when the reported speed assumes ``config``; a warning tells
    the user how to load the model for that speed, or that the setting did not help.
    """
    from service.engine.evaluate import compare_latency

    default = evaluation["latency"]
    configured = compare_latency(
        original_path, output_path, feed, runs=limits.latency_runs, limits=limits,
        threads=threads, check_cancelled=check_cancelled, candidate_config=config)
    setting = ", ".join(f"{k}={v}" for k, v in config.items())
    settings = {
        "default": {"speedup": default["speedup"], "after_ms": default["after_ms"],
                    "before_ms": default["before_ms"]},
        setting: {"speedup": configured["speedup"], "after_ms": configured["after_ms"],
                  "before_ms": configured["before_ms"], "session_config": dict(config)},
    }
    entries = ", ".join(f"SessionOptions.add_session_config_entry('{k}', '{v}')"
                        for k, v in config.items())
    if (configured["speedup"] or 0.0) > (default["speedup"] or 0.0):
        configured["session_config"] = dict(config)
        configured["session_settings"] = settings
        evaluation["latency"] = configured
        warnings.append(
            f"the speed reported ({configured['speedup']:.2f}x) assumes the session option "
            f"{setting}: load the model with {entries}; ONNX Runtime's default session runs "
            f"it at {default['speedup']:.2f}x the original's speed")
    else:
        default["session_settings"] = settings
        warnings.append(
            f"the speed reported ({default['speedup']:.2f}x) is ONNX Runtime's default "
            f"session; the session option {setting} measured {configured['speedup']:.2f}x")


def measurement_note(profile: Any) -> dict[str, Any]:
    """Where this job's numbers come from: this host's kernels, and whether they are the
    target's (same architecture and the same kernel-selecting ISA features)."""
    from service.engine.devices import host_profile
    from service.engine.devices.features import describe

    host = host_profile()
    host_feats = describe(host.architecture, host.isa_features)
    out: dict[str, Any] = {"host": host.title, "host_features": host_feats}
    if profile is None or profile.name == "host":
        out.update(target="host", host_is_target=True,
                   note="fidelity and latency measured on the target itself (this host)")
        return out
    same = profile.same_kernels_as(host)
    target_feats = describe(profile.architecture, profile.isa_features)
    out.update(target=profile.name, target_features=target_feats, host_is_target=same)
    if same:
        out["note"] = (f"this host runs the same kernels as {profile.name} ({host_feats}): "
                       "fidelity and latency measured here stand for the target")
    else:
        out["note"] = (f"fidelity and latency were measured with this host's kernels "
                       f"({host.architecture}: {host_feats}), not {profile.name}'s "
                       f"({profile.architecture}: {target_feats}); the target's latency is "
                       "a cost-model estimate")
    return out


def _step_progress(
    progress: Callable[[str, float], None], stage: str, base: float, span: float
) -> Callable[[float, str], None]:
    """A pass's progress (fraction of the pass, message) as the job's overall fraction."""

    def report(fraction: float, message: str) -> None:
        progress(stage, base + span * min(max(fraction, 0.0), 1.0))

    return report


def _target_estimates(
    profile: Any, original: Path, candidate: Path, feed: dict, warnings: list[str]
) -> dict | None:
    """Cost-model estimates on the job's target device (None when the target is the host)."""
    if profile is None:
        return None
    from service.engine import cost_model

    shapes: dict[str, Sequence[int]] = {k: [int(d) for d in v.shape] for k, v in feed.items()}
    try:
        before = cost_model.estimate(original, profile, input_shapes=shapes)
        after = cost_model.estimate(candidate, profile, input_shapes=shapes)
    except Exception:  # an estimate is an extra: the measured results still stand
        log.exception("target estimate failed")
        warnings.append(f"no latency estimate for {profile.name}: the cost model failed")
        return None
    return {
        "device": profile.name,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "speedup": before.latency_ms / after.latency_ms if after.latency_ms > 0 else None,
        "input_shapes": shapes,
    }


def _check_runs(session: Any, feed: dict, workdir: Path) -> None:
    """Refuse up front a model that ONNX Runtime cannot run on the dataset's first sample
    (no pass could help, and a later failure would wrongly blame a pass)."""
    from service.engine.inputs import adapt_feed

    try:
        session.run(None, adapt_feed(session, feed))
    except Exception as exc:
        raise EngineError(
            "unsupported_model",
            f"the model fails on the dataset's first sample: {scrub(str(exc), workdir)}",
            {"eval_inputs": "dataset", "shapes": {k: list(v.shape) for k, v in feed.items()}},
        ) from None


def _zstd_size(path: Path) -> int:
    """Bytes of ``path`` once zstd-compressed (streamed; nothing written)."""
    import zstandard

    class _Count(io.RawIOBase):
        n = 0

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            self.n += len(data)
            return len(data)

    counter = _Count()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    with open(path, "rb") as src:
        cctx.copy_stream(src, cast("IO[bytes]", counter), size=path.stat().st_size)
    return counter.n


def _maybe_zstd(path: Path) -> Path | None:
    import zstandard

    raw = path.stat().st_size
    out = path.with_name(path.name + ".zst")
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    with open(path, "rb") as src, open(out, "wb") as dst:
        cctx.copy_stream(src, dst, size=raw)
    if out.stat().st_size < ZSTD_KEEP_RATIO * raw:
        return out
    out.unlink()
    return None
