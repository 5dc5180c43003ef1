"""Accuracy-aware mixed precision: per-layer sensitivity, then the fewest layers kept in float
that meet the accuracy or fidelity constraint (as Intel Neural Compressor's tuning does).

Each probe applies the candidate's recipe through ``service.engine.pipeline.apply_steps`` (the
same guard as any job), with the probed layers excluded by the passes' shared scope option.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from service.engine.pipeline import apply_steps
from service.engine.registry import PassContext, parse_recipe
from service.engine.scope import can_exclude_nodes, exclude_nodes, weighted_layers
from service.engine.search.candidate import Candidate, LayerSensitivity, MixedPrecisionRecord
from service.engine.search.score import DEFAULT_MIN_FIDELITY, SearchContext

log = logging.getLogger(__name__)

_QUANT_OPS = ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "ConvTranspose", "Attention")
SENSITIVITY_MAX_LAYERS = 16  # most layers probed one by one for mixed precision
SENSITIVITY_SAMPLES = 128


# ---------------------------------------------------------------------------------------------
# Mixed precision (accuracy-aware tuning)


def tune_mixed_precision(
    cand: Candidate, model: onnx.ModelProto, dataset: dict | None, labels: Any,
    ctx: SearchContext, available: dict[str, Any], limits: EngineLimits, workdir: Path,
    check_cancelled: Callable[[], None],
    eval_data: tuple[dict | None, Any] | None = None,
) -> tuple[list[dict] | None, MixedPrecisionRecord]:
    """Per-layer sensitivity, then the fewest float layers that meet the accuracy constraint.

    Returns (recipe or None, record). Layers are tried one at a time kept in float (the
    others quantized as in ``cand``); the metric gain ranks them; then the top 1, 2, ...
    layers stay float until the quick evaluation meets the constraint.
    """
    from service.engine.evaluate import (
        accuracy,
        compare_output,
        dataset_feeds,
        generate_feeds,
        make_session,
        run_all,
    )

    excl_steps = [i for i, s in enumerate(cand.recipe)
                  if can_exclude_nodes(available[s["pass"]])]
    record: MixedPrecisionRecord = {"from": cand.name, "sensitivity": [], "kept_float": []}
    if not excl_steps:
        record["result"] = "no pass of this candidate can keep layers in float"
        return None, record
    c = ctx.constraints
    eval_set, eval_labels = eval_data if eval_data is not None else (dataset, labels)
    use_acc = c.max_accuracy_drop is not None and eval_labels is not None
    metric = "accuracy" if use_acc else ("top1" if c.fidelity_metric == "top1" else "cosine")
    target = c.min_fidelity if c.min_fidelity is not None else DEFAULT_MIN_FIDELITY
    workdir.mkdir(parents=True, exist_ok=True)
    original_path = workdir / "original.onnx"
    onnx.save_model(model, str(original_path))
    if eval_set is not None:
        feeds, label_chunks = dataset_feeds(model, eval_set, eval_labels, SENSITIVITY_SAMPLES * 4)
    else:
        feeds, label_chunks = generate_feeds(model, SENSITIVITY_SAMPLES // 4, plan=ctx.inputs), None
    ref_session = make_session(original_path, limits.latency_threads)
    ref = run_all(ref_session, feeds)
    acc_before = None
    cls_out = None
    if use_acc and label_chunks is not None:
        cls_out = next(iter(ref))
        acc_before = accuracy(ref[cls_out], label_chunks)

    def quick(excluded: list[str], tag: str) -> float:
        recipe = [exclude_nodes(s, excluded) if i in excl_steps else dict(s)
                  for i, s in enumerate(cand.recipe)]
        current = onnx.ModelProto()
        current.CopyFrom(model)

        def context(index: int, cls: Any, step_dir: Path) -> PassContext:
            original_copy = onnx.ModelProto()
            original_copy.CopyFrom(model)
            return PassContext(workdir=step_dir, dataset=dataset, labels=labels,
                               original=original_copy, check_cancelled=check_cancelled,
                               target=ctx.profile, inputs=ctx.inputs)

        current, _ = apply_steps(current, parse_recipe(recipe), workdir / tag, context,
                                 check_cancelled)
        path = workdir / f"{tag}.onnx"
        onnx.save_model(current, str(path))
        out = run_all(make_session(path, limits.latency_threads), feeds)
        path.unlink()
        if metric == "accuracy" and cls_out is not None and label_chunks is not None:
            return accuracy(out[cls_out], label_chunks) - (acc_before or 0.0)  # -drop
        fids = [compare_output(ref[k], out[k]) for k in ref]
        key = "top1_agreement" if metric == "top1" else "cosine"
        values = [f[key] for f in fids if f.get(key) is not None]
        return min(values) if values else -1.0

    def fits(value: float) -> bool:
        if metric == "accuracy":
            return -value <= (c.max_accuracy_drop or 0.0)
        return value >= target

    layers = weighted_layers(model, _QUANT_OPS)[:SENSITIVITY_MAX_LAYERS]
    try:
        base = quick([], "base")
        scores: list[LayerSensitivity] = []
        for index, (name, op, _weights) in enumerate(layers):
            check_cancelled()
            value = quick([name], f"probe{index}")
            scores.append({"layer": name, "op": op, "metric_if_float": round(value, 6),
                           "gain": round(value - base, 6)})
        scores.sort(key=lambda s: -s["gain"])
        record["metric"] = metric
        record["base"] = round(base, 6)
        record["sensitivity"] = scores
        kept: list[str] = []
        for entry in scores:
            check_cancelled()
            kept.append(entry["layer"])
            if len(kept) >= len(layers):
                break
            try:
                value = quick(kept, f"keep{len(kept)}")
            except EngineError as exc:  # e.g. too little left to quantize: stop adding
                record["result"] = (f"keeping {', '.join(kept)} in float: {exc.message}")
                return None, record
            if fits(value):
                record["kept_float"] = list(kept)
                record["quick_metric"] = round(value, 6)
                recipe = [exclude_nodes(s, kept) if i in excl_steps else dict(s)
                          for i, s in enumerate(cand.recipe)]
                return recipe, record
    except EngineError as exc:
        record["result"] = f"sensitivity analysis failed: {exc.message}"
        return None, record
    except Exception as exc:  # a pass or ORT failure while probing: report, do not abort
        log.exception("mixed precision probing failed")
        record["result"] = f"sensitivity analysis failed: {type(exc).__name__}"
        return None, record
    record["result"] = "no mix of float layers met the constraint"
    return None, record


