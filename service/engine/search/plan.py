"""Planning: what the model is made of, and which candidates to try for the target device.

``plan_candidates`` asks one planner per fast format of the device (``PLANNERS``, in the
profile's order of preference) to add candidates; each builds its recipe from the passes' typed
configs (validated when planned, so a planner asking for an option a pass lacks fails that
candidate, not the job). Then pruning levels are combined with the best int8 candidate when a
dataset allows recovery, fp16 is the fallback when the device lists nothing buildable, and
weight-only int8 is added for every model on every device (within ``max_candidates``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
from pydantic import ValidationError

from service.engine.decoder import decoder_spec
from service.engine.devices import DeviceProfile
from service.engine.int8_encoding import saturates
from service.engine.registry import registered_passes
from service.engine.search.candidate import Candidate

log = logging.getLogger(__name__)

# Recovery training of pruning candidates is bounded by steps, not seconds, so that the same
# job gives the same model on a busy worker (the seconds cap only guards against a stall).
PRUNING_RECOVERY_BUDGET = {"max_steps": 150, "max_seconds": 300.0}
WEIGHT_ONLY, WEIGHT_ONLY_PASS = "int8_weight_only", "quantize_weight_only"


# ---------------------------------------------------------------------------------------------
# What the model is made of


def model_family(model: onnx.ModelProto) -> dict:
    """The share of weight bytes per layer kind and the family it implies.

    A causal decoder with a KV cache (``service.engine.decoder.decoder_spec``) is ``"decoder"``,
    with ``recognised_by`` saying how; the other families are told by their weight shares."""
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
    out: dict[str, Any] = {"family": family, "weight_share": share, "op_types": ops}
    decoder = decoder_spec(model)
    if decoder is not None:
        out.update(family="decoder", recognised_by=decoder.recognised_by,
                   decoder=decoder.describe())
    return out


# ---------------------------------------------------------------------------------------------
# Candidates

_STATIC = {
    "int8_static_qdq_u8s8": ("uint8", "int8", "QDQ uint8 activations, int8 per-channel weights"),
    "int8_static_qdq_s8s8": ("int8", "int8", "QDQ symmetric int8 activations and weights"),
    "int8_static_qdq_u8u8": ("uint8", "uint8", "QDQ uint8 activations and weights"),
    "int16_static_qdq_u16u8": ("uint16", "uint8", "QDQ uint16 activations, uint8 weights (w8a16)"),
}
BW_SPEED = 4.0  # int8 weights: 4x less traffic; an optimistic speed bound for memory-bound nets


class PlanError(ValueError):
    """A planner asked a pass for options its config does not accept."""


def step(name: str, **options: Any) -> dict[str, Any]:
    """A recipe step for pass ``name``, its options validated by the pass's typed config now.

    The step holds the options as given (``{"pass": name, **options}``, what the report shows);
    a pass that is not registered is left to ``plan_candidates`` to skip."""
    cls = registered_passes().get(name)
    if cls is not None:
        try:
            cls.config_model.model_validate(options)
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
            raise PlanError(f"pass {name!r} has no option {', '.join(fields)} for this "
                            "format") from None
    return {"pass": name, **options}


def _static_step(fmt: str, *, reduce_range: bool = False,
                 op_types: list[str] | None = None) -> dict[str, Any]:
    act, weight, _ = _STATIC[fmt]
    options: dict[str, Any] = {"activation_type": act, "weight_type": weight,
                               "per_channel": True}
    if fmt == "int8_static_qdq_s8s8":
        options["symmetric_activations"] = True
    if reduce_range:
        options["reduce_range"] = True
    if op_types:
        options["op_types"] = op_types
    return step("quantize_static", **options)


def _best_peak_ratio(profile: DeviceProfile, precision: str) -> float:
    return max(1.0, profile.peak(precision) / profile.peak("fp32"))


@dataclass
class Plan:
    """What the planners see (the device, the model's weight shares) and what they add."""

    profile: DeviceProfile
    family: dict
    has_dataset: bool
    available: set[str]
    training: bool
    out: list[Candidate] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        share = self.share = self.family["weight_share"]
        self.has_conv, self.has_mm = share["conv"] > 0, share["matmul"] > 0
        self.has_rnn = share["recurrent"] > 0
        self.cpu = (self.profile.kind == "cpu"
                    or self.profile.execution_providers[0] == "CPUExecutionProvider")
        self.int8_speed = _best_peak_ratio(self.profile, "int8")
        # On a target whose u8s8 kernels saturate, every int8 candidate uses 7-bit weights (the
        # passes choose so, see ``int8_encoding``): name them so, and build each kind once.
        self.saturates = saturates(self.profile)

    def add(self, name: str, recipe: Callable[[], list[dict]], formats: list[str], reason: str,
            size: float, speed: float) -> None:
        """Add a candidate unless a pass is missing or the name is taken; ``recipe`` builds the
        steps (a ``PlanError`` makes it a failed candidate)."""
        if any(c.name == name for c in self.out):
            return
        try:
            steps, error = recipe(), None
        except PlanError as exc:
            steps, error = [], {"code": "invalid_recipe", "message": str(exc)}
        missing = sorted({s["pass"] for s in steps} - self.available)
        if missing:
            self.skipped.append({"candidate": name, "formats": formats,
                                 "reason": f"pass not available: {', '.join(missing)}"})
            return
        cand = Candidate(name, steps, formats, reason, size, speed)
        if error is not None:
            cand.status, cand.error = "failed", error
        self.out.append(cand)

    def skip(self, fmt: str, reason: str) -> None:
        self.skipped.append({"format": fmt, "reason": reason})

    def add_dynamic(self, seven_bit: bool) -> None:
        size = 0.25 + 0.75 * self.share["conv"]
        speed = max(self.int8_speed, BW_SPEED)
        if seven_bit:
            self.add("int8_dynamic_reduce_range",
                     lambda: [step("quantize_dynamic", reduce_range=True)], ["int8_dynamic"],
                     "dynamic int8 with 7-bit weights (x86 without VNNI)", size, speed)
        else:
            self.add("int8_dynamic", lambda: [step("quantize_dynamic")], ["int8_dynamic"],
                     "dynamic int8 for MatMul/Gemm/LSTM/GRU (weights dominate, CPU kernels)",
                     size, speed)


def _plan_static(plan: Plan, fmt: str) -> None:
    static_fmt = "int8_static_qdq_u8s8" if fmt == "int8_reduce_range" else fmt
    rr = fmt == "int8_reduce_range" or (plan.saturates and _STATIC[static_fmt][1] == "int8")
    if static_fmt == "int8_static_qdq_u8s8" and rr:
        label = "int8_static_reduce_range"  # the u8s8 default: one name either way
    else:
        label = fmt.replace("_static_qdq", "") + ("_reduce_range" if rr else "")
    speed = max(plan.int8_speed, BW_SPEED)
    if not plan.has_dataset and not plan.family.get("op_types", {}).get("BatchNormalization"):
        # Activation ranges need data: without a dataset only BatchNorm statistics can stand
        # in for it (ZeroQ, quantize_static's data_free); calibrating on generated noise would
        # claim a fidelity real inputs do not have. The data-free candidates stay.
        plan.skip(fmt, "no dataset, and no BatchNormalization statistics to synthesise "
                  "calibration inputs from: static int8 would be calibrated on generated noise "
                  "(upload a calibration dataset)")
        if rr and (plan.has_mm or plan.has_rnn):
            plan.add_dynamic(seven_bit=True)
        return
    if (plan.has_rnn and (plan.has_conv or plan.has_mm) and plan.cpu
            and plan.profile.runs_fast("int8_dynamic")):
        # static QDQ does not cover LSTM/GRU: mix static (conv/matmul) + dynamic (rnn)
        plan.add(f"{label}+dynamic_rnn",
                 lambda: [_static_step(static_fmt, reduce_range=rr,
                                       op_types=["Conv", "MatMul", "Gemm"]),
                          step("quantize_dynamic", op_types=["LSTM", "GRU"], reduce_range=rr)],
                 [static_fmt, "int8_dynamic"],
                 "mix: static int8 for convolutions/MatMul, dynamic int8 for recurrent layers",
                 0.25, speed)
    if plan.has_conv or plan.has_mm:
        why = _STATIC[static_fmt][2] + (", 7-bit weights (no VNNI)" if rr else "")
        plan.add(label, lambda: [_static_step(static_fmt, reduce_range=rr)], [static_fmt], why,
                 0.25 if not plan.has_rnn else 0.25 + 0.75 * plan.share["recurrent"], speed)
    else:
        plan.skip(fmt, "no Conv/MatMul layer to quantize statically")
    if rr and (plan.has_mm or plan.has_rnn):
        plan.add_dynamic(seven_bit=True)


def _plan_dynamic(plan: Plan, fmt: str) -> None:
    if plan.has_mm or plan.has_rnn:
        plan.add_dynamic(seven_bit=plan.saturates)
    else:
        plan.skip(fmt, "no MatMul/recurrent layer (dynamic int8 convolutions are slower than "
                  "float in ONNX Runtime)")


def int4_size_factor(mm: float, block_size: int, *, zero_points: bool = False,
                     int8_share: float = 0.0, tables_int8: bool = False) -> float:
    """Expected file bytes over float32 bytes for int4 MatMul weights (``mm`` of the weights):
    4 bits + a 32-bit scale per block (+ 32 bits per block for HQQ's float zero points, kept as
    a correction term), ``int8_share`` of them at 8 bits; the rest float, or 8 bits + a scale
    per 128 where the embedding tables go int8."""
    bits = 4 + 32 / block_size + (32 / block_size if zero_points else 0.0)
    bits += int8_share * 4
    rest = (8 + 32 / 128) / 32 if tables_int8 else 1.0
    return mm * bits / 32 + (1 - mm) * rest


# Mixed int4/int8 for decoders: this share of the MatMul weights (elements) may stay 8-bit,
# picked by measured sensitivity (``int4_weight_only``'s ``int8_share``): ~+0.4 bit per weight.
DECODER_INT8_SHARE = 0.1
DECODER_BLOCK = 128  # calibration-aware int4 at block 128 reaches block-32 RTN quality


def _plan_int4_decoder(plan: Plan, mm: float) -> None:
    """A causal decoder LLM (``model_family`` "decoder"): the embedding table int8 in every
    candidate (float it would be the largest tensor left: 1/15 of an int4 Llama-3-8B), block
    128 for the calibration-aware methods, and mixed int4/int8 by measured layer sensitivity;
    no dynamic int8 for the rest (what remains float is norms and activations)."""
    def add(name: str, why: str, block: int, method: str = "rtn", share: float = 0.0) -> None:
        options: dict[str, Any] = {"embedding": "int8"}
        if method != "rtn":
            options["method"] = method
        if block != 64:
            options["block_size"] = block
        if share:
            options["int8_share"] = share
        plan.add(name, lambda: [step("int4_weight_only", **options)], ["int4_weight_only"],
                 f"decoder: {why}; embedding table int8",
                 int4_size_factor(mm, block, zero_points=method == "hqq", int8_share=share,
                                  tables_int8=True), 8.0)

    b = DECODER_BLOCK
    if plan.has_dataset:
        add(f"int4_gptq_b{b}", f"int4 GPTQ (error compensation from the dataset), block {b}", b,
            "gptq")
        add(f"int4_gptq_b{b}_int8_{int(DECODER_INT8_SHARE * 100)}",
            f"int4 GPTQ block {b}, the most sensitive MatMuls (up to "
            f"{DECODER_INT8_SHARE:.0%} of the weights, measured on the dataset) at int8", b,
            "gptq", DECODER_INT8_SHARE)
        add(f"int4_awq_b{b}", f"int4 AWQ-style activation-aware scales, block {b}", b, "awq")
    add(f"int4_hqq_b{b}", f"int4 HQQ (data-free fitted scales), block {b}", b, "hqq")
    add(f"int4_rtn_b{b}_int8_{int(DECODER_INT8_SHARE * 100)}",
        f"int4 round-to-nearest block {b}, the most sensitive MatMuls (up to "
        f"{DECODER_INT8_SHARE:.0%} of the weights, measured on "
        f"{'the dataset' if plan.has_dataset else 'generated token ids'}) at int8", b,
        "rtn", DECODER_INT8_SHARE)
    add("int4_rtn_b32", "int4 round-to-nearest, block 32 (the quality baseline)", 32)


def _plan_int4(plan: Plan, fmt: str) -> None:
    mm = plan.share["matmul"]
    if mm < 0.3:
        plan.skip(fmt, "MatMul weights are a small share of the model")
        return
    if plan.family.get("family") == "decoder":
        _plan_int4_decoder(plan, mm)
        return
    plan.add("int4_weight_only", lambda: [step("int4_weight_only")], ["int4_weight_only"],
             "int4 block-wise weights for MatMul (memory-bound MatMul-heavy model)",
             0.14 * mm + (1 - mm), 8.0)
    if plan.cpu and plan.profile.runs_fast("int8_dynamic") and mm < 0.98:
        plan.add("int4_weight_only+int8_dynamic",
                 lambda: [step("int4_weight_only"), step("quantize_dynamic")],
                 ["int4_weight_only", "int8_dynamic"],
                 "mix: int4 MatMul weights, dynamic int8 for the remaining layers",
                 0.14 * mm + 0.25 * (1 - mm), 8.0)
    # Calibration-aware int4 (same size as RTN, closer to float): HQQ needs no data, GPTQ and
    # AWQ calibrate on the job's dataset.
    methods = {"hqq": "HQQ (data-free fitted scales)"}
    if plan.has_dataset:
        methods |= {"gptq": "GPTQ (error compensation from the dataset)",
                    "awq": "AWQ-style activation-aware scales from the dataset"}
    for method, why in methods.items():
        plan.add(f"int4_{method}",
                 lambda method=method: [  # type: ignore[misc]
                     step("int4_weight_only", method=method)],
                 ["int4_weight_only"], f"int4 block-wise weights for MatMul, {why}",
                 0.14 * mm + (1 - mm), 8.0)


def _plan_fp16(plan: Plan, fmt: str) -> None:
    plan.add("fp16", lambda: [step("fp16")], ["fp16"], "half precision is native on this device",
             0.5, _best_peak_ratio(plan.profile, "fp16"))


def _plan_bf16(plan: Plan, fmt: str) -> None:
    plan.skip(fmt, "no bf16 pass; fp16 covers the size gain")


def _plan_sparse_2_4(plan: Plan, fmt: str) -> None:
    if plan.training and plan.has_dataset and (plan.has_conv or plan.has_mm):
        plan.add("sparse_2_4+fp16", lambda: [step("prune_2_4"), step("fp16")],
                 ["sparse_2_4", "fp16"], "2:4 sparsity for sparse tensor cores, fp16", 0.5,
                 2 * _best_peak_ratio(plan.profile, "fp16"))
    elif not (plan.has_dataset and plan.training):
        plan.skip(fmt, "2:4 pruning needs training on a dataset to recover accuracy (training "
                  "disabled or no dataset)")
    else:
        plan.skip(fmt, "no prunable layers")


# One planner per device format (``DeviceProfile.quant_formats``); a format without one is not
# buildable here and is passed over.
PLANNERS: dict[str, Callable[[Plan, str], None]] = {
    **{fmt: _plan_static for fmt in (*_STATIC, "int8_reduce_range")},
    "int8_dynamic": _plan_dynamic,
    "int4_weight_only": _plan_int4,
    "fp16": _plan_fp16,
    "bf16": _plan_bf16,
    "sparse_2_4": _plan_sparse_2_4,
}


def _plan_pruning(plan: Plan) -> None:
    """Channel pruning levels on top of the device's best int8 format (size objective; needs
    data to recover accuracy by distillation)."""
    best = next((c for c in plan.out if any(f in _STATIC for f in c.formats)), None)
    if not (plan.training and plan.has_dataset and plan.family["family"] in ("cnn", "mlp")
            and best is not None):
        return
    for ratio in (0.25, 0.5):
        plan.add(f"prune_channels_{int(ratio * 100)}+{best.name}",
                 lambda ratio=ratio, best=best: [  # type: ignore[misc]
                     step("prune_channels", ratio=ratio, recover=True,
                          recovery={"budget": PRUNING_RECOVERY_BUDGET}), *best.recipe],
                 ["pruning", *best.formats],
                 f"structured pruning of {int(ratio * 100)} % of channels (recovered by "
                 "distillation), then int8", best.size_factor * (1 - ratio) ** 2,
                 best.speed_bound / (1 - ratio) ** 2)


def plan_candidates(
    profile: DeviceProfile, family: dict, *, has_dataset: bool, available: set[str],
    max_candidates: int = 10, training: bool = True, external: bool = False,
) -> tuple[list[Candidate], list[dict]]:
    """Candidates for ``profile`` and a model of ``family``, most promising first.

    Returns (candidates, skipped) where ``skipped`` says which fast formats of the device have
    no candidate and why (no pass for it, or nothing in the model it would help). ``external``:
    the model's weights are kept in external data, so only candidates that stream are planned.
    """
    plan = Plan(profile, family, has_dataset, available, training)
    for fmt in profile.quant_formats:
        planner = PLANNERS.get(fmt)
        if planner is not None:
            planner(plan, fmt)
    _plan_pruning(plan)
    if not plan.out and "fp16" in available and "fp16" not in profile.quant_formats:
        # The device lists no format we can build: fp16 at least halves the file.
        plan.add("fp16", lambda: [step("fp16")], ["fp16"],
                 "fallback: the device lists no buildable fast format; fp16 halves the file",
                 0.5, 1.0)
    if external:  # weights kept on disk: only steps that read them one tensor at a time
        _plan_streaming(plan)
    out = plan.out[:max_candidates]
    safe = _weight_only(plan)
    if safe is not None:
        out = [*out[:max(max_candidates - 1, 0)], safe]
    return out, plan.skipped


def _plan_streaming(plan: Plan) -> None:
    """Keep the candidates whose every step streams (``Pass.cannot_stream``); RTN int4 where the
    device has int4 but only calibration-aware int4 was planned; the rest are skipped with
    their reason."""
    from service.engine.registry import parse_recipe

    kept = []
    for cand in plan.out:
        why = "its recipe is invalid" if cand.status == "failed" else "; ".join(
            r for cls, cfg in parse_recipe(cand.recipe) if (r := cls.cannot_stream(cfg)))
        if why:
            plan.skipped.append({"candidate": cand.name, "formats": cand.formats, "reason": why})
        else:
            kept.append(cand)
    plan.out = kept
    if ("int4_weight_only" in plan.profile.quant_formats and plan.has_mm
            and not any("int4" in c.name for c in kept) and "int4_weight_only" in plan.available):
        plan.add("int4_weight_only", lambda: [step("int4_weight_only", method="rtn",
                                                   embedding="float", int8_share=0.0)],
                 ["int4_weight_only"], "int4 block-wise MatMul weights, one tensor at a time "
                 "(the model's weights are kept in external data)",
                 int4_size_factor(plan.share["matmul"], 64), 1.0)


def _weight_only(plan: Plan) -> Candidate | None:
    """The safe win every float model gets on every device: int8 weights with float compute
    need no data, no calibration and no int8 kernels. Its speed is measured both in ONNX
    Runtime's default session and with the weights folded at load (the recipe job reports the
    faster, saying which setting it assumes), so it is chosen when the objective allows that
    speed."""
    if WEIGHT_ONLY_PASS not in plan.available:
        return None
    plan.add(WEIGHT_ONLY, lambda: [step(WEIGHT_ONLY_PASS)], ["int8_weight_only"],
             "int8 weights with float compute (no data, no int8 kernels, any device)", 0.25, 1.0)
    return next(c for c in plan.out if c.name == WEIGHT_ONLY)
