"""Auto mode: search compression candidates for a target device under constraints.

``run_auto`` is what ``run_pipeline(recipe="auto")`` delegates to. It

1. ingests the model once, describes what it is made of (CNN, transformer, recurrent, MLP: the
   share of weights held by Conv, MatMul/Gemm and LSTM/GRU layers) and resolves the device
   profile (``service.engine.devices``);
2. plans candidates from what the device runs fast (``DeviceProfile.quant_formats``, in the
   profile's order of preference) and what the model is made of: static int8 QDQ in the
   device's flavour (u8s8, s8s8 symmetric for TensorRT, u8u8 / u16u8 for QNN, reduce-range for
   x86 without VNNI), dynamic int8 for MatMul/recurrent layers on CPUs, int4 weight-only for
   MatMul-heavy models, fp16 where it is native, mixes (static convolutions + dynamic
   recurrent layers, int4 MatMul + int8 rest), and channel pruning levels combined with int8
   when a dataset allows recovery;
3. runs each candidate through ``run_pipeline`` (measured on this host: size, latency against
   the original, fidelity, accuracy) and estimates it on the target with the cost model
   (latency, peak memory, energy); candidates run in parallel processes when the host has the
   cores (one latency-measuring process per 4 cores), in order of promise;
4. stops early when a candidate meets every constraint and no remaining one can beat it on the
   objective (optimistic bounds from the formats: size factor, peak-throughput ratio);
5. when a candidate misses only the accuracy/fidelity constraint, measures per-layer
   sensitivity (each quantized layer kept in float alone) and keeps the most sensitive layers
   in float, one more at a time, until it fits ("accuracy-aware mixed precision", as Intel
   Neural Compressor's tuning does), recording which layers;
6. judges accuracy and fidelity on held-out samples: with a dataset of at least 2 samples,
   every third one is kept out of calibration and retraining (the candidates' pipelines get
   the other two thirds);
7. when the objective involves latency and the host can stand for the target, re-measures the
   best few candidates head to head with the original (one process, interleaved rounds);
8. picks the best candidate for the objective among those meeting every constraint, never one
   slower than the original on this host when the objective involves latency and the target is
   measurable here (a CPU with the host's kernel-selecting ISA features: AVX2, AVX-512, VNNI,
   AMX, dot-product...); otherwise the report says that the
   target latency is an estimate.

The result is the chosen candidate's ``PipelineResult`` whose report gains an ``auto`` section:
the device, the constraints, the model family, every candidate (failed ones with their reason),
the chosen one and why, the Pareto front (size, latency, fidelity; plot-ready points) and the
cost model's predicted-vs-measured latency on this host. When nothing meets the constraints it
raises ``EngineError("constraints_unsatisfiable")`` with the closest candidate and every
constraint it missed, by how much.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import onnx

from service.engine import cost_model
from service.engine.constraints import AutoConstraints, parse_constraints
from service.engine.devices import DeviceProfile, host_profile, parse_device
from service.engine.errors import EngineError
from service.engine.inputs import InputPlan
from service.engine.int8_encoding import saturates
from service.engine.limits import EngineLimits
from service.engine.wording import describe_speedup

log = logging.getLogger(__name__)

DEFAULT_MIN_FIDELITY = 0.99  # cosine, when the job gives no accuracy or fidelity constraint
AUTO_EVAL_SAMPLES = 512  # evaluation samples for auto (accuracy needs more than a recipe job)
SENSITIVITY_MAX_LAYERS = 16  # most layers probed one by one for mixed precision
SENSITIVITY_SAMPLES = 128
# Recovery training of pruning candidates is bounded by steps, not seconds, so that the same
# job gives the same model on a busy worker (the seconds cap only guards against a stall).
PRUNING_RECOVERY_BUDGET = {"max_steps": 150, "max_seconds": 300.0}
WEIGHT_ONLY, WEIGHT_ONLY_PASS = "int8_weight_only", "quantize_weight_only"
_QUANT_OPS = ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "ConvTranspose", "Attention")


# ---------------------------------------------------------------------------------------------
# Constraints


# ---------------------------------------------------------------------------------------------
# What the model is made of


def model_family(model: onnx.ModelProto) -> dict:
    """The share of weight bytes per layer kind and the family it implies."""
    inits = {i.name: i for i in model.graph.initializer}
    share = {"conv": 0.0, "matmul": 0.0, "recurrent": 0.0, "other": 0.0}
    ops: dict[str, int] = {}
    used: set[str] = set()
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        kind = ("conv" if node.op_type in ("Conv", "ConvTranspose")
                else "matmul" if node.op_type in ("MatMul", "Gemm", "Attention")
                else "recurrent" if node.op_type in ("LSTM", "GRU", "RNN") else "other")
        for name in node.input:
            if name in inits and name not in used:
                used.add(name)
                t = inits[name]
                share[kind] += math.prod(t.dims) if t.dims else 1
    total = sum(share.values()) or 1.0
    share = {k: round(v / total, 4) for k, v in share.items()}
    attention = ops.get("Softmax", 0) > 0 and ops.get("MatMul", 0) >= 4
    if share["recurrent"] >= 0.2:
        family = "recurrent"
    elif attention or (share["matmul"] >= 0.5 and ops.get("LayerNormalization", 0) > 0):
        family = "transformer"
    elif share["conv"] >= 0.3:
        family = "cnn"
    elif share["matmul"] >= 0.5:
        family = "mlp"
    else:
        family = "other"
    return {"family": family, "weight_share": share, "op_types": ops}


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    """One recipe tried by the search and what came of it."""

    name: str
    recipe: list[dict]
    formats: list[str]
    reason: str
    size_factor: float  # optimistic bound on size_after / size_before (early stop)
    speed_bound: float  # optimistic bound on the target speedup (early stop)
    status: str = "pending"  # ok | failed | not_run | rejected
    error: dict | None = None
    metrics: dict = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)
    mixed_precision: MixedPrecisionRecord | None = None
    result: Any = None  # PipelineResult (not serialised)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "recipe": self.recipe, "formats": self.formats,
            "reason": self.reason, "status": self.status, "error": self.error,
            "metrics": self.metrics, "violations": self.violations,
            "meets_constraints": self.status == "ok" and not self.violations,
            "mixed_precision": self.mixed_precision,
        }


_STATIC = {
    "int8_static_qdq_u8s8": ("uint8", "int8", "QDQ uint8 activations, int8 per-channel weights"),
    "int8_static_qdq_s8s8": ("int8", "int8", "QDQ symmetric int8 activations and weights"),
    "int8_static_qdq_u8u8": ("uint8", "uint8", "QDQ uint8 activations and weights"),
    "int16_static_qdq_u16u8": ("uint16", "uint8", "QDQ uint16 activations, uint8 weights (w8a16)"),
}


def _static_step(fmt: str, *, reduce_range: bool = False, op_types: list[str] | None = None) -> dict:
    act, weight, _ = _STATIC[fmt]
    step: dict[str, Any] = {"pass": "quantize_static", "activation_type": act,
                            "weight_type": weight, "per_channel": True}
    if fmt == "int8_static_qdq_s8s8":
        step["symmetric_activations"] = True
    if reduce_range:
        step["reduce_range"] = True
    if op_types:
        step["op_types"] = op_types
    return step


def _best_peak_ratio(profile: DeviceProfile, precision: str) -> float:
    return max(1.0, profile.peak(precision) / profile.peak("fp32"))


def plan_candidates(
    profile: DeviceProfile, family: dict, *, has_dataset: bool, available: set[str],
    max_candidates: int = 10, training: bool = True,
) -> tuple[list[Candidate], list[dict]]:
    """Candidates for ``profile`` and a model of ``family``, most promising first.

    Returns (candidates, skipped) where ``skipped`` says which fast formats of the device have
    no candidate and why (no pass for it, or nothing in the model it would help).
    """
    share = family["weight_share"]
    fam = family["family"]
    has_conv, has_mm, has_rnn = share["conv"] > 0, share["matmul"] > 0, share["recurrent"] > 0
    cpu = profile.kind == "cpu" or profile.execution_providers[0] == "CPUExecutionProvider"
    out: list[Candidate] = []
    skipped: list[dict] = []
    int8_speed = _best_peak_ratio(profile, "int8")
    # On a target whose u8s8 kernels saturate, every int8 candidate uses 7-bit weights (the
    # passes choose so, see ``int8_encoding``): name them so, and build each kind once.
    target_saturates = saturates(profile)
    bw = 4.0  # int8 weights: 4x less traffic; an optimistic speed bound for memory-bound nets

    def add(name: str, recipe: list[dict], formats: list[str], reason: str, size: float,
            speed: float) -> None:
        needed = {s["pass"] for s in recipe}
        missing = sorted(needed - available)
        if missing:
            skipped.append({"candidate": name, "formats": formats,
                            "reason": f"pass not available: {', '.join(missing)}"})
            return
        if any(c.name == name for c in out):
            return
        out.append(Candidate(name, recipe, formats, reason, size, speed))

    def add_dynamic(seven_bit: bool) -> None:
        if seven_bit:
            add("int8_dynamic_reduce_range",
                [{"pass": "quantize_dynamic", "reduce_range": True}], ["int8_dynamic"],
                "dynamic int8 with 7-bit weights (x86 without VNNI)",
                0.25 + 0.75 * share["conv"], max(int8_speed, bw))
        else:
            add("int8_dynamic", [{"pass": "quantize_dynamic"}], ["int8_dynamic"],
                "dynamic int8 for MatMul/Gemm/LSTM/GRU (weights dominate, CPU kernels)",
                0.25 + 0.75 * share["conv"], max(int8_speed, bw))

    for fmt in profile.quant_formats:
        if fmt in _STATIC or fmt == "int8_reduce_range":
            static_fmt = "int8_static_qdq_u8s8" if fmt == "int8_reduce_range" else fmt
            rr = fmt == "int8_reduce_range" or (target_saturates and _STATIC[static_fmt][1] == "int8")
            if static_fmt == "int8_static_qdq_u8s8" and rr:
                label = "int8_static_reduce_range"  # the u8s8 default: one name either way
            else:
                label = fmt.replace("_static_qdq", "") + ("_reduce_range" if rr else "")
            if has_rnn and (has_conv or has_mm) and cpu and profile.runs_fast("int8_dynamic"):
                # static QDQ does not cover LSTM/GRU: mix static (conv/matmul) + dynamic (rnn)
                add(f"{label}+dynamic_rnn",
                    [_static_step(static_fmt, reduce_range=rr, op_types=["Conv", "MatMul", "Gemm"]),
                     {"pass": "quantize_dynamic", "op_types": ["LSTM", "GRU"], "reduce_range": rr}],
                    [static_fmt, "int8_dynamic"],
                    "mix: static int8 for convolutions/MatMul, dynamic int8 for recurrent layers",
                    0.25, max(int8_speed, bw))
            if has_conv or has_mm:
                why = _STATIC[static_fmt][2] + (", 7-bit weights (no VNNI)" if rr else "")
                add(label, [_static_step(static_fmt, reduce_range=rr)], [static_fmt], why,
                    0.25 if not has_rnn else 0.25 + 0.75 * share["recurrent"],
                    max(int8_speed, bw))
            else:
                skipped.append({"format": fmt, "reason": "no Conv/MatMul layer to quantize statically"})
            if rr and (has_mm or has_rnn):
                add_dynamic(seven_bit=True)
        elif fmt == "int8_dynamic":
            if has_mm or has_rnn:
                add_dynamic(seven_bit=target_saturates)
            else:
                skipped.append({"format": fmt, "reason": "no MatMul/recurrent layer (dynamic "
                                "int8 convolutions are slower than float in ONNX Runtime)"})
        elif fmt == "int4_weight_only":
            if share["matmul"] >= 0.3:
                add("int4_weight_only", [{"pass": "int4_weight_only"}], ["int4_weight_only"],
                    "int4 block-wise weights for MatMul (memory-bound MatMul-heavy model)",
                    0.14 * share["matmul"] + (1 - share["matmul"]), 8.0)
                if cpu and profile.runs_fast("int8_dynamic") and (share["matmul"] < 0.98):
                    add("int4_weight_only+int8_dynamic",
                        [{"pass": "int4_weight_only"}, {"pass": "quantize_dynamic"}],
                        ["int4_weight_only", "int8_dynamic"],
                        "mix: int4 MatMul weights, dynamic int8 for the remaining layers",
                        0.14 * share["matmul"] + 0.25 * (1 - share["matmul"]), 8.0)
            else:
                skipped.append({"format": fmt, "reason": "MatMul weights are a small share of "
                                "the model"})
        elif fmt == "fp16":
            add("fp16", [{"pass": "fp16"}], ["fp16"],
                "half precision is native on this device", 0.5, _best_peak_ratio(profile, "fp16"))
        elif fmt == "bf16":
            skipped.append({"format": fmt, "reason": "no bf16 pass; fp16 covers the size gain"})
        elif fmt == "sparse_2_4":
            if training and has_dataset and (has_conv or has_mm):
                add("sparse_2_4+fp16", [{"pass": "prune_2_4"}, {"pass": "fp16"}],
                    ["sparse_2_4", "fp16"],
                    "2:4 sparsity for sparse tensor cores, fp16", 0.5,
                    2 * _best_peak_ratio(profile, "fp16"))
            else:
                skipped.append({"format": fmt, "reason": "2:4 pruning needs training on a "
                                "dataset to recover accuracy (training disabled or no dataset)"
                                if not (has_dataset and training) else "no prunable layers"})

    # Channel pruning levels on top of the device's best int8 format (size objective; needs
    # data to recover accuracy by distillation).
    best_int8 = next((c for c in out if any(f in _STATIC for f in c.formats)), None)
    if training and has_dataset and fam in ("cnn", "mlp") and best_int8 is not None:
        for ratio in (0.25, 0.5):
            add(f"prune_channels_{int(ratio * 100)}+{best_int8.name}",
                [{"pass": "prune_channels", "ratio": ratio, "recover": True,
                  "recovery": {"budget": PRUNING_RECOVERY_BUDGET}}, *best_int8.recipe],
                ["pruning", *best_int8.formats],
                f"structured pruning of {int(ratio * 100)} % of channels (recovered by "
                "distillation), then int8", best_int8.size_factor * (1 - ratio) ** 2,
                best_int8.speed_bound / (1 - ratio) ** 2)
    if not out and "fp16" in available and "fp16" not in profile.quant_formats:
        # The device lists no format we can build: fp16 at least halves the file.
        add("fp16", [{"pass": "fp16"}], ["fp16"],
            "fallback: the device lists no buildable fast format; fp16 halves the file", 0.5, 1.0)
    return out[:max_candidates], skipped


# ---------------------------------------------------------------------------------------------
# Running candidates


def _filter_step(step: dict, available: dict[str, Any]) -> tuple[dict, list[str]]:
    """Keep only the options the pass's config accepts; say which were dropped."""
    cls = available[step["pass"]]
    fields = set(cls.config_model.model_fields)
    kept = {"pass": step["pass"], **{k: v for k, v in step.items() if k != "pass" and k in fields}}
    dropped = [k for k in step if k != "pass" and k not in fields]
    return kept, dropped


# Options without which a candidate would not be what it claims (e.g. s8s8 without a way to
# ask for int8 activations): dropping one of these fails the candidate.
_ESSENTIAL = {"activation_type", "weight_type", "op_types", "ratio", "reduce_range"}


def _run_candidate(job: dict, check_cancelled: Callable[[], None] | None = None) -> dict:
    """Run one candidate through the pipeline (top level: runs in a worker process too).

    In-process (sequential search) the job's ``check_cancelled`` is passed down so that a
    cancellation stops the candidate between stages; a cancellation is re-raised, any other
    ``EngineError`` makes the candidate a failed one.
    """
    from service.engine.pipeline import run_pipeline

    started = time.perf_counter()
    try:
        result = run_pipeline(
            Path(job["model_path"]), job["recipe"], Path(job["workdir"]),
            dataset_path=Path(job["dataset_path"]) if job["dataset_path"] else None,
            eval_dataset_path=(Path(job["eval_dataset_path"])
                               if job.get("eval_dataset_path") else None),
            device=job["device"], limits=EngineLimits.model_validate(job["limits"]),
            check_cancelled=check_cancelled or (lambda: None), inputs=job.get("inputs"),
        )
    except EngineError as exc:
        if exc.code == "cancelled":
            raise
        return {"ok": False, "error": exc.to_dict(), "seconds": time.perf_counter() - started}
    except Exception as exc:  # a library bug in one candidate must not stop the search
        log.exception("auto candidate failed")
        return {"ok": False, "seconds": time.perf_counter() - started,
                "error": {"code": "pass_failed", "message": f"{type(exc).__name__}: {exc}"[:300]}}
    return {"ok": True, "result": result, "seconds": time.perf_counter() - started}


def _fidelity_value(summary: dict, metric: str) -> float | None:
    if metric == "top1":
        values = [f.get("top1_agreement") for f in summary["fidelity"].values()
                  if f.get("top1_agreement") is not None]
        return min(values) if values else None
    return summary.get("min_cosine")


@dataclass
class _Context:
    profile: DeviceProfile
    constraints: AutoConstraints
    measurable: bool  # the target's latency can be measured on this host
    input_shapes: dict[str, Sequence[int]] | None = None
    original_estimate: cost_model.Estimate | None = None
    original_host_ms: float | None = None
    original_bytes: int | None = None
    # Speed noise on this host: max(p, 1/p) for the original measured against a second session
    # of itself, set by the head-to-head confirmation; "not slower" allows that much.
    placebo_band: float | None = None
    inputs: InputPlan | None = None  # resolved inputs when there is no dataset


def _metrics(cand: Candidate, result: Any, ctx: _Context) -> None:
    s = result.summary
    shapes = result.report.get("latency", {}).get("input_shapes")
    est = cost_model.estimate(result.model_path, ctx.profile, input_shapes=shapes)
    stored = min(s["bytes_after"], s.get("bytes_after_zstd") or s["bytes_after"])
    drop = None
    if s.get("accuracy_before") is not None and s.get("accuracy_after") is not None:
        drop = s["accuracy_before"] - s["accuracy_after"]
    cand.metrics = {
        "bytes": s["bytes_after"],
        "bytes_stored": stored,
        "size_mb": round(s["bytes_after"] / 1e6, 4),
        "size_ratio": s["size_ratio"],
        "host_latency_ms": s["latency_ms_after"],
        "host_latency_ms_original": s["latency_ms_before"],
        "host_speedup": s["speedup"],
        "target_latency_ms": round(est.latency_ms, 5),
        "target_speedup": (ctx.original_estimate.latency_ms / est.latency_ms
                           if ctx.original_estimate and est.latency_ms > 0 else None),
        "target_memory_mb": round(est.peak_memory_mb, 3),
        "target_energy_mj": round(est.energy_mj, 5),
        "target_unsupported": est.unsupported,
        "min_cosine": s["min_cosine"],
        "top1_agreement": _fidelity_value(s, "top1"),
        "accuracy_before": s.get("accuracy_before"),
        "accuracy_after": s.get("accuracy_after"),
        "accuracy_drop": drop,
        "warnings": s.get("warnings", []),
    }
    if ctx.original_host_ms is None:
        ctx.original_host_ms = s["latency_ms_before"]
        ctx.original_bytes = s["bytes_before"]


def _miss(constraint: str, limit: float, value: float | None, higher_is_worse: bool = True) -> dict | None:
    if value is None:
        return {"constraint": constraint, "limit": limit, "value": None,
                "missed_by": None, "reason": "not measurable for this model"}
    over = value - limit if higher_is_worse else limit - value
    if over <= 0:
        return None
    return {"constraint": constraint, "limit": limit, "value": round(value, 6),
            "missed_by": round(over, 6),
            "missed_by_pct": round(100.0 * over / abs(limit), 2) if limit else None}


def _violations(cand: Candidate, ctx: _Context) -> list[dict]:
    c, m, p = ctx.constraints, cand.metrics, ctx.profile
    out: list[dict | None] = []
    if c.max_size_mb is not None:
        out.append(_miss("max_size_mb", c.max_size_mb, m["bytes_stored"] / 1e6))
    out.append(_miss("device_storage_budget_mb", p.storage_budget_mb, m["bytes_stored"] / 1e6))
    if c.max_latency_ms is not None:
        on_host = c.latency_on == "host" or p.name == "host"
        miss = _miss("max_latency_ms", c.max_latency_ms,
                     m["host_latency_ms"] if on_host else m["target_latency_ms"])
        if miss is not None:
            miss["where"] = "host (measured)" if on_host else f"{p.name} (estimated)"
        out.append(miss)
    if c.max_memory_mb is not None:
        out.append(_miss("max_memory_mb", c.max_memory_mb, m["target_memory_mb"]))
    out.append(_miss("device_memory_mb", p.memory_mb, m["target_memory_mb"]))
    if c.max_accuracy_drop is not None:
        out.append(_miss("max_accuracy_drop", c.max_accuracy_drop, m["accuracy_drop"]))
    min_fid = c.min_fidelity
    if min_fid is None and c.max_accuracy_drop is None:
        min_fid = DEFAULT_MIN_FIDELITY
    if min_fid is not None:
        key = "top1_agreement" if c.fidelity_metric == "top1" else "min_cosine"
        out.append(_miss(f"min_fidelity({c.fidelity_metric})", min_fid, m[key],
                         higher_is_worse=False))
    # Never slower than the original when the objective involves latency: measured where the
    # host can stand for the target, else (objective "latency") on the cost-model estimate.
    speed, rule = None, None
    if c.objective in ("latency", "balanced") and ctx.measurable:
        speed, rule = m["host_speedup"], "not_slower_on_host"
    elif c.objective == "latency":
        speed, rule = m["target_speedup"], "not_slower_on_target(estimated)"
    limit = 1.0 / ctx.placebo_band if ctx.placebo_band and rule == "not_slower_on_host" else 1.0
    if rule is not None and speed is not None and speed < limit:
        miss = {"constraint": rule, "limit": round(limit, 4),
                "value": round(speed, 4), "missed_by": round(limit - speed, 4),
                "missed_by_pct": round(100.0 * (limit - speed) / limit, 2)}
        if limit != 1.0:
            miss["placebo_band"] = round(ctx.placebo_band or 1.0, 4)
        out.append(miss)
    return [v for v in out if v is not None]


def _latency_for_objective(cand: Candidate, ctx: _Context) -> float:
    return cand.metrics["host_latency_ms"] if ctx.measurable else cand.metrics["target_latency_ms"]


def _score(cand: Candidate, ctx: _Context) -> tuple[float, float]:
    """Lower is better: (primary, tie-break) for the objective."""
    size = cand.metrics["bytes_stored"] / max(ctx.original_bytes or 1, 1)
    if ctx.measurable:
        lat = cand.metrics["host_latency_ms"] / max(ctx.original_host_ms or 1e-9, 1e-9)
    else:
        base = ctx.original_estimate.latency_ms if ctx.original_estimate else 1.0
        lat = cand.metrics["target_latency_ms"] / max(base, 1e-12)
    if ctx.constraints.objective == "size":
        return size, lat
    if ctx.constraints.objective == "latency":
        return lat, size
    return math.sqrt(size * lat), size


def _bound(cand: Candidate, ctx: _Context) -> float:
    """The best primary score ``cand`` could reach (optimistic; for early stopping)."""
    size = cand.size_factor * 0.9
    lat = 1.0 / (cand.speed_bound * 1.25)
    if ctx.constraints.objective == "size":
        return size
    if ctx.constraints.objective == "latency":
        return lat
    return math.sqrt(size * lat)


# ---------------------------------------------------------------------------------------------
# Mixed precision (accuracy-aware tuning)


def _quantized_layers(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in _QUANT_OPS and node.name:
            weight = sum(math.prod(inits[i].dims) for i in node.input if i in inits)
            if weight:
                out.append((node.name, node.op_type, int(weight)))
    return sorted(out, key=lambda t: -t[2])


class LayerSensitivity(TypedDict):
    """One layer's probe: the metric with only this layer kept float, and the gain over none."""

    layer: str
    op: str
    metric_if_float: float
    gain: float


# One record per candidate mixed precision was tried on (``report["auto"]["mixed_precision"]``
# is a list of these, in the order tried): "from" the candidate's name, the metric probed and
# its value with every layer quantized ("base"), the layers most sensitive first, the layers
# kept float (empty when none fitted), the quick metric of the kept mix, and "result" saying
# why nothing was applied.
MixedPrecisionRecord = TypedDict("MixedPrecisionRecord", {
    "from": str,
    "metric": str,
    "base": float,
    "sensitivity": list[LayerSensitivity],
    "kept_float": list[str],
    "quick_metric": float,
    "result": str,
}, total=False)


def _mixed_precision(
    cand: Candidate, model: onnx.ModelProto, dataset: dict | None, labels: Any,
    ctx: _Context, available: dict[str, Any], limits: EngineLimits, workdir: Path,
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
    from service.engine.registry import PassContext, parse_recipe

    excl_steps = [i for i, s in enumerate(cand.recipe)
                  if "nodes_to_exclude" in available[s["pass"]].config_model.model_fields]
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
        recipe = [dict(s, nodes_to_exclude=excluded) if i in excl_steps else dict(s)
                  for i, s in enumerate(cand.recipe)]
        current = onnx.ModelProto()
        current.CopyFrom(model)
        for index, (cls, config) in enumerate(parse_recipe(recipe)):
            step_dir = workdir / f"{tag}_{index}"
            step_dir.mkdir(parents=True, exist_ok=True)
            original_copy = onnx.ModelProto()
            original_copy.CopyFrom(model)
            current = cls().run(current, config, PassContext(
                workdir=step_dir, dataset=dataset, labels=labels, original=original_copy,
                check_cancelled=check_cancelled, target=ctx.profile,
                inputs=ctx.inputs))
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

    layers = _quantized_layers(model)[:SENSITIVITY_MAX_LAYERS]
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
                recipe = [dict(s, nodes_to_exclude=list(kept)) if i in excl_steps else dict(s)
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


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


def _split_holdout(
    model: onnx.ModelProto, dataset: dict, labels: Any, directory: Path,
) -> tuple[dict, Any, dict | None, Any, Path | None, Path | None, dict]:
    """Keep every third sample out of calibration and training (``split_for_evaluation``).

    Returns (train arrays, train labels, holdout arrays, holdout labels, train .npz path,
    holdout .npz path, split record); the holdout (and both paths) are None for a dataset of a
    single sample. Candidates calibrate/train on the train file and evaluate on the holdout.
    """
    import numpy as np

    from service.engine.dataset import split_for_evaluation

    train, train_labels, hold, hold_labels, record = split_for_evaluation(model, dataset, labels)
    if hold is None:
        return dataset, labels, None, None, None, None, record
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arrays_in, lab in (("train_split", train, train_labels),
                                 ("holdout_split", hold, hold_labels)):
        arrays = dict(arrays_in)
        if lab is not None:
            arrays["labels"] = lab
        path = directory / f"{name}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        paths.append(path)
    return train, train_labels, hold, hold_labels, paths[0], paths[1], record


def _holdout_metrics(
    cand: Candidate, original_path: Path, model: onnx.ModelProto, holdout: dict,
    labels: Any, limits: EngineLimits,
) -> None:
    """Fidelity and accuracy of ``cand`` on the held-out samples (what the constraints use)."""
    from service.engine.evaluate import (
        accuracy,
        compare_output,
        dataset_feeds,
        is_classifier_like,
        make_session,
        run_all,
    )

    feeds, label_chunks = dataset_feeds(model, holdout, labels, limits.eval_samples)
    ref = run_all(make_session(original_path, limits.latency_threads), feeds)
    out = run_all(make_session(cand.result.model_path, limits.latency_threads), feeds)
    fidelity = {k: compare_output(ref[k], out[k]) for k in ref if k in out}
    cosines = [f["cosine"] for f in fidelity.values()]
    tops = [f["top1_agreement"] for f in fidelity.values() if f["top1_agreement"] is not None]
    m = cand.metrics
    m["pipeline_min_cosine"], m["pipeline_accuracy_after"] = m["min_cosine"], m["accuracy_after"]
    m["min_cosine"] = None if not cosines or None in cosines else min(cosines)
    m["top1_agreement"] = min(tops) if tops else None
    m["holdout_fidelity"] = {k: {x: f.get(x) for x in ("cosine", "sqnr_db", "max_abs_error",
                                                     "top1_agreement")}
                             for k, f in fidelity.items()}
    m["holdout_samples"] = sum(next(iter(f.values())).shape[0] for f in feeds)
    cls_out = next((k for k in ref if is_classifier_like(ref[k])), None)
    if label_chunks is not None and cls_out is not None and cls_out in out:
        before, after = accuracy(ref[cls_out], label_chunks), accuracy(out[cls_out], label_chunks)
        m["accuracy_before"], m["accuracy_after"] = before, after
        m["accuracy_drop"] = before - after


def _evaluation_note(dataset: dict | None, holdout: dict | None,
                     record: dict | None = None) -> dict:
    if holdout is None:
        return {"split": None, "record": record,
                "note": "constraints judged on the evaluation inputs of each candidate's "
                "pipeline" + (" (a single sample: evaluated in-sample)"
                              if dataset is not None else " (generated inputs)")}
    n_train = next(iter(dataset.values())).shape[0] if dataset else 0
    n_hold = next(iter(holdout.values())).shape[0]
    return {"split": "every third sample held out", "train_samples": int(n_train),
            "holdout_samples": int(n_hold),
            "note": "calibration and retraining saw only the train split; accuracy and "
                    "fidelity constraints are judged on the held-out samples"}


# ---------------------------------------------------------------------------------------------
# Confirming host latency

CONFIRM_FINALISTS = 4


# A placebo farther off than this says the host was disturbed, not that slower is fine.
MAX_PLACEBO_BAND = 1.10


def _confirm_latency(
    cands: list[Candidate], ctx: _Context, original_path: Path, model: onnx.ModelProto,
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
        key=lambda c: _score(c, ctx))[:CONFIRM_FINALISTS]
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
        sessions[cand.name] = make_session(cand.result.model_path, limits.latency_threads)
    measured = measure_latency(sessions, feed, runs=2 * limits.latency_runs,
                               warmup=limits.latency_warmup, check_cancelled=check_cancelled)
    base = measured["original"]["median_ms"]
    ctx.original_host_ms = base
    placebo_ms = measured["placebo"]["median_ms"]
    placebo = base / placebo_ms if placebo_ms > 0 else 1.0
    ctx.placebo_band = min(max(placebo, 1.0 / placebo), MAX_PLACEBO_BAND)
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


# ---------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(cands: list[Candidate], ctx: _Context, original: dict) -> dict:
    """Plot-ready points (size MB, latency ms, fidelity) and the non-dominated set."""
    points = [original]
    for cand in cands:
        if cand.status != "ok" and cand.status != "rejected":
            continue
        m = cand.metrics
        points.append({
            "candidate": cand.name,
            "size_mb": m["size_mb"],
            "latency_ms": _latency_for_objective(cand, ctx),
            "host_latency_ms": m["host_latency_ms"],
            "target_latency_ms": m["target_latency_ms"],
            "fidelity": m["min_cosine"],
            "accuracy": m["accuracy_after"],
            "meets_constraints": not cand.violations,
            "formats": cand.formats,
        })

    def key(p: dict) -> tuple[float, float, float]:
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
    return {
        "axes": {"x": "size_mb", "y": "latency_ms", "color": "fidelity"},
        "latency_source": "host_measured" if ctx.measurable else "target_estimate",
        "points": points,
        "front": sorted(front, key=lambda n: next(p["size_mb"] for p in points if p["candidate"] == n)),
    }


# ---------------------------------------------------------------------------------------------
# The search


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_auto(
    model_path: Path,
    workdir: Path,
    *,
    dataset_path: Path | None = None,
    device: dict | str | None = None,
    constraints: dict | None = None,
    progress: Callable[[str, float], None] = lambda stage, fraction: None,
    check_cancelled: Callable[[], None] = lambda: None,
    resolve_model: Callable[[str], Path] | None = None,
    limits: EngineLimits | None = None,
    inputs: dict[str, Any] | None = None,
) -> Any:
    """Search compression candidates for ``device`` under ``constraints``; return the best.

    Returns a ``PipelineResult`` (the chosen candidate, its model copied to
    ``workdir/output/model.onnx``) whose report has an ``auto`` section (see the module
    docstring). Raises ``EngineError``: ``invalid_device``/``unknown_device``,
    ``invalid_constraints``, the ingest codes, ``already_quantized``, ``cancelled`` (from
    ``check_cancelled``) and ``constraints_unsatisfiable`` with the closest candidate.

    Without a dataset, the inputs (``inputs`` given with the job, the rest probed) are
    resolved once here and handed to every candidate as given shapes and values.
    """
    from service.engine.dataset import load_dataset
    from service.engine.ingest import load_model
    from service.engine.inputs import check_inputs, input_signature, parse_inputs
    from service.engine.normalise import normalise
    from service.engine.pipeline import PipelineResult
    from service.engine.registry import registered_passes

    started = time.perf_counter()
    workdir = Path(workdir)
    limits = limits or EngineLimits()
    profile = parse_device(device) if device is not None else host_profile()
    cons = parse_constraints(constraints)
    host = host_profile()
    # Measured only where this host runs the target's kernels (same ISA features), else the
    # cost model's estimate decides latency.
    measurable = profile.name == "host" or profile.same_kernels_as(host)

    progress("ingest", 0.0)
    ingested = load_model(Path(model_path), workdir / "auto_input", limits=limits)
    description = ingested.description
    if description["already_quantized"]:
        raise EngineError(
            "already_quantized",
            "the model is already quantized (" + ", ".join(description["quantization"])
            + "); auto mode compresses float models. Send the float model.",
            {"quantization": description["quantization"]})
    given = parse_inputs(inputs)
    check_inputs(given, input_signature(ingested.model))
    dataset = labels = None
    holdout: dict | None = None
    holdout_labels = None
    train_path: Path | None = None
    holdout_path: Path | None = None
    split_record: dict | None = None
    if dataset_path is not None:
        dataset, labels = load_dataset(Path(dataset_path), ingested.model, limits)
        (dataset, labels, holdout, holdout_labels, train_path, holdout_path,
         split_record) = _split_holdout(ingested.model, dataset, labels, workdir / "auto_input")
    run_dataset_path = train_path or dataset_path
    if cons.max_accuracy_drop is not None and labels is None:
        raise EngineError(
            "invalid_constraints",
            "max_accuracy_drop needs a dataset with labels; without labels use min_fidelity",
            {"errors": [{"field": "max_accuracy_drop", "message": "needs dataset labels"}]})
    check_cancelled()
    progress("normalise", 0.03)
    model, _notes = normalise(ingested.model, limits)
    family = model_family(model)
    passes = registered_passes()
    cands, skipped = plan_candidates(
        profile, family, has_dataset=dataset is not None, available=set(passes),
        max_candidates=cons.max_candidates, training=cons.training)
    if not cands:
        raise EngineError(
            "constraints_unsatisfiable",
            f"no compression technique available for {profile.name} fits this model",
            {"device": profile.name, "skipped": skipped, "closest": None, "missed": []})

    # Validate every recipe against its pass's config now (a mismatch is a failed candidate).
    for cand in cands:
        steps = []
        for step in cand.recipe:
            kept, dropped = _filter_step(step, passes)
            if set(dropped) & _ESSENTIAL:
                cand.status = "failed"
                cand.error = {"code": "invalid_recipe", "message":
                              f"pass {step['pass']!r} has no option "
                              f"{', '.join(sorted(set(dropped) & _ESSENTIAL))} for this format"}
            steps.append(kept)
        cand.recipe = steps

    eval_limits = limits.model_copy(update={
        "eval_samples": max(limits.eval_samples, AUTO_EVAL_SAMPLES if dataset is not None else limits.eval_samples)})
    ctx = _Context(profile, cons, measurable)
    original_path = workdir / "auto_input" / "normalised.onnx"
    original_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(original_path))
    device_arg = profile.model_dump(mode="json")
    if dataset is None:
        ctx.inputs = _resolve_once(model, original_path, given, eval_limits, workdir,
                                   check_cancelled)
    job_inputs = ctx.inputs.as_inputs() if ctx.inputs is not None else None

    def job(cand: Candidate, index: int) -> dict:
        return {"model_path": str(model_path), "recipe": cand.recipe,
                "workdir": str(workdir / "candidates" / f"{index:02d}_{cand.name}"),
                "dataset_path": str(run_dataset_path) if run_dataset_path else None,
                "eval_dataset_path": str(holdout_path) if holdout_path else None,
                "device": device_arg, "limits": eval_limits.model_dump(mode="json"),
                "inputs": job_inputs}

    best: Candidate | None = None
    stop_reason: str | None = None
    runnable = [c for c in cands if c.status == "pending"]
    workers = cons.workers or max(1, _usable_cores() // 4)
    workers = min(workers, len(runnable)) or 1
    total = len(runnable)
    done_count = 0

    def finish(cand: Candidate, outcome: dict) -> None:
        nonlocal best, done_count
        done_count += 1
        progress(f"search:{cand.name}", 0.05 + 0.8 * done_count / max(total, 1))
        if not outcome["ok"]:
            cand.status, cand.error = "failed", outcome["error"]
            cand.metrics = {"build_seconds": round(outcome["seconds"], 2)}
            return
        cand.result = outcome["result"]
        if ctx.original_estimate is None:
            shapes = cand.result.report.get("latency", {}).get("input_shapes")
            ctx.input_shapes = shapes
            ctx.original_estimate = cost_model.estimate(original_path, profile, input_shapes=shapes)
        _metrics(cand, cand.result, ctx)
        if holdout is not None:
            _holdout_metrics(cand, original_path, ingested.model, holdout, holdout_labels,
                             eval_limits)
        cand.metrics["build_seconds"] = round(outcome["seconds"], 2)
        cand.status = "ok"
        cand.violations = _violations(cand, ctx)
        if not cand.violations and (best is None or _score(cand, ctx) < _score(best, ctx)):
            best = cand

    def unbeatable(pending: list[Candidate]) -> bool:
        if best is None:
            return False
        primary = _score(best, ctx)[0]
        return all(_bound(c, ctx) >= primary for c in pending)

    pending = sorted(runnable, key=lambda c: _bound(c, ctx))
    if workers <= 1:
        for index, cand in enumerate(list(pending)):
            check_cancelled()
            if unbeatable(pending[index:]):
                stop_reason = f"{best.name} meets every constraint and no remaining candidate can beat it on {cons.objective}"  # type: ignore[union-attr]
                break
            progress(f"search:{cand.name}", 0.05 + 0.8 * done_count / max(total, 1))
            finish(cand, _run_candidate(job(cand, cands.index(cand)), check_cancelled))
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            queue = list(pending)
            running: dict[Future, Candidate] = {}
            while queue or running:
                check_cancelled()
                if queue and unbeatable(queue) and stop_reason is None:
                    stop_reason = f"{best.name} meets every constraint and no remaining candidate can beat it on {cons.objective}"  # type: ignore[union-attr]
                    queue = []
                while queue and len(running) < workers:
                    cand = queue.pop(0)
                    running[pool.submit(_run_candidate, job(cand, cands.index(cand)))] = cand
                if not running:
                    break
                done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(running.pop(fut), fut.result())
    for cand in cands:
        if cand.status == "pending":
            cand.status = "not_run"
            cand.error = {"code": "early_stop", "message": stop_reason or "not run"}

    # Accuracy-aware mixed precision for candidates that miss only accuracy/fidelity.
    mp_tried: list[MixedPrecisionRecord] = []  # one record per candidate tried, in order
    if best is None:
        fid_only = [c for c in cands if c.status == "ok" and c.violations and all(
            v["constraint"].startswith(("max_accuracy_drop", "min_fidelity")) for v in c.violations)]
        fid_only.sort(key=lambda c: _score(c, ctx))
        for cand in fid_only[:2]:
            check_cancelled()
            progress("search:mixed_precision", 0.86)
            recipe, record = _mixed_precision(
                cand, model, dataset, labels, ctx, passes, eval_limits,
                workdir / "mixed_precision", check_cancelled,
                eval_data=(holdout, holdout_labels) if holdout is not None else None)
            mp_tried.append(record)
            if recipe is None:
                continue
            mixed = Candidate(f"{cand.name}+mixed_precision", recipe, cand.formats,
                              f"{cand.name} with the {len(record['kept_float'])} most sensitive "
                              "layers kept in float", cand.size_factor, cand.speed_bound,
                              mixed_precision=record)
            cands.append(mixed)
            total += 1
            finish(mixed, _run_candidate(job(mixed, len(cands) - 1), check_cancelled))
            if best is not None:
                break

    # The safe win: weight-only int8 needs no data, no calibration and no int8 kernels, so it
    # is tried whenever nothing else met the constraints; it is chosen when it meets them (its
    # speed under the default session counts: an objective that cares about latency keeps it
    # out unless it is not slower).
    if best is None and WEIGHT_ONLY_PASS in passes and not any(
            c.name == WEIGHT_ONLY for c in cands):
        check_cancelled()
        progress("search:weight_only", 0.88)
        safe = Candidate(WEIGHT_ONLY, [{"pass": WEIGHT_ONLY_PASS}], ["int8_weight_only"],
                         "int8 weights with float compute (no data, no int8 kernels): the "
                         "fallback when no faster format met the constraints", 0.25, 1.0)
        cands.append(safe)
        total += 1
        finish(safe, _run_candidate(job(safe, len(cands) - 1), check_cancelled))

    # Head-to-head re-measurement of the finalists on this host: one process, interleaved
    # rounds, twice as many as a single candidate got; the choice rests on these numbers.
    confirmation = None
    if measurable and cons.objective in ("latency", "balanced"):
        check_cancelled()
        progress("search:confirm", 0.9)
        confirmation = _confirm_latency(cands, ctx, original_path, ingested.model, dataset,
                                        labels, eval_limits, check_cancelled)
        if confirmation is not None:
            best = None
            for cand in cands:
                if cand.status == "ok":
                    cand.violations = _violations(cand, ctx)
                    if not cand.violations and (best is None or _score(cand, ctx) < _score(best, ctx)):
                        best = cand

    # Host calibration of the cost model: predicted vs measured latency on this machine.
    host_cal = None
    ok = [c for c in cands if c.status == "ok"]
    if ok and ctx.original_host_ms:
        samples: list[tuple[Any, float, str]] = [(original_path, ctx.original_host_ms, "original")]
        samples += [(c.result.model_path, c.metrics["host_latency_ms"], c.name) for c in ok]
        try:
            host_cal = cost_model.calibrate_host(samples, host,
                                                 input_shapes=ctx.input_shapes).to_dict()
        except Exception:  # calibration is evidence, never a reason to fail the job
            log.exception("host calibration failed")

    original_point = {
        "candidate": "original", "size_mb": round((ctx.original_bytes or 0) / 1e6, 4),
        "latency_ms": (ctx.original_host_ms if measurable else
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
    auto_section: dict[str, Any] = {
        "device": {k: device_arg[k] for k in ("name", "title", "kind", "execution_providers",
                                              "precisions", "quant_formats", "static_shapes")},
        "target_measured": measurable,
        "constraints": effective,
        "objective": cons.objective,
        "model": family,
        "candidates": [c.to_dict() for c in cands],
        "skipped_formats": skipped,
        "early_stop": {"stopped": stop_reason is not None, "reason": stop_reason},
        "mixed_precision": mp_tried,
        "pareto_front": front,
        "cost_model": {
            "target_original": ctx.original_estimate.to_dict() if ctx.original_estimate else None,
            "host_calibration": host_cal,
        },
        "workers": workers,
        "latency_confirmation": confirmation,
        "evaluation": _evaluation_note(dataset, holdout, split_record),
        "search_seconds": round(time.perf_counter() - started, 2),
    }
    if not measurable:
        auto_section["note"] = (
            f"{profile.title} cannot be measured on this host: target latency, memory and "
            "energy are cost-model estimates; host latency is shown for reference")

    if best is None:
        _fail(cands, ctx, auto_section)
    chosen: Candidate = best  # type: ignore[assignment]
    progress("report", 0.95)
    result = chosen.result
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
    if front is not None:
        for point in front["points"]:
            point["chosen"] = point["candidate"] == chosen.name
    auto_section["chosen"] = {
        "candidate": chosen.name, "recipe": chosen.recipe, "formats": chosen.formats,
        "why": _why(chosen, cands, ctx),
        "target_estimate": chosen_est.to_dict(),
    }
    summary = dict(result.summary)
    if holdout is not None:
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
    summary["auto"] = {"candidate": chosen.name, "device": profile.name,
                       "target_latency_ms": chosen.metrics["target_latency_ms"],
                       "target_speedup": chosen.metrics["target_speedup"]}
    warnings = list(summary.get("warnings", []))
    if not measurable:
        warnings.append(f"latency on {profile.name} is estimated by the cost model, not measured")
    summary["warnings"] = warnings
    report = dict(result.report)
    if ctx.inputs is not None:  # the candidates were given what the search resolved
        report["eval_inputs"] = dict(report.get("eval_inputs") or {},
                                     resolution=ctx.inputs.record)
    report["recipe"] = chosen.recipe
    report["mode"] = "auto"
    report["auto"] = auto_section
    report["summary"] = summary
    report["warnings"] = warnings
    report["device"] = device_arg
    progress("report", 1.0)
    return PipelineResult(model_path=artifacts["model.onnx"], report=report, summary=summary,
                          artifacts=artifacts)


def _resolve_once(
    model: onnx.ModelProto, path: Path, given: dict, limits: EngineLimits, workdir: Path,
    check_cancelled: Callable[[], None],
) -> InputPlan:
    """The inputs every candidate is evaluated on (probed once on the normalised original)."""
    from service.engine.inputs import resolve_inputs
    from service.engine.pipeline import _load_session, _scrub

    session = _load_session(path, limits, workdir)
    return resolve_inputs(model, session, given, scrub=lambda text: _scrub(text, workdir),
                          check_cancelled=check_cancelled)


def _why(chosen: Candidate, cands: list[Candidate], ctx: _Context) -> str:
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


def _fail(cands: list[Candidate], ctx: _Context, auto_section: dict) -> None:
    ran = [c for c in cands if c.status == "ok"]
    if not ran:
        failures = [{"candidate": c.name, "error": c.error} for c in cands]
        raise EngineError(
            "constraints_unsatisfiable",
            f"no candidate could be built for {ctx.profile.name}: "
            + "; ".join(f"{c.name}: {(c.error or {}).get('message', '')}" for c in cands)[:600],
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
