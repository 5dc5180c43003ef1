"""How int8 weights are encoded for a target CPU, and why (one rule for every int8 pass).

On x86 without VNNI/AMX, ONNX Runtime's u8s8 kernels multiply with ``vpmaddubsw``: two
adjacent u8 x s8 products are added into a saturating int16 before they reach the 32-bit
accumulator. Full-range int8 weights (|w| <= 127) next to large uint8 activations overflow it
(255 x 127 x 2 = 64770 > 32767) and the results clip silently; measured on the test corpus's
digits CNN on an AVX2-only EPYC: accuracy 0.997 float, 0.578 static int8, 0.997 with 7-bit
weights. ONNX Runtime documents two ways out: ``reduce_range`` (weights in [-64, 64], so a pair
stays within 255 x 64 x 2 = 32640) or uint8 weights (u8u8 kernels widen to 16 bits first).
VNNI (``vpdpbusd``), AMX and Arm's dot products accumulate in 32 bits and need neither.

``choose_int8_encoding`` picks ``reduce_range`` for a pass from the job's target and the host
that measures the job:

- the user's explicit choice wins (a choice known to saturate on the target is said so);
- uint8 weights never saturate: full range;
- a target that saturates gets 7-bit weights;
- a target that does not, measured on a host that does, also gets 7-bit weights: otherwise the
  fidelity the job reports would be the host's clipped arithmetic, not the target's (the cost is
  one bit of weight precision on the target; say ``reduce_range: false`` to choose otherwise).

Standard library and the device profiles only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from service.engine.devices.features import describe, u8s8_saturates
from service.engine.devices.profile import DeviceProfile

# The weight range with reduce_range (ONNX Runtime's reduced int8 range).
REDUCED_INT8_MAX = 64
FULL_INT8_MAX = 127


@dataclass(frozen=True)
class Int8Encoding:
    """The chosen weight encoding of one int8 pass, with its reason (lands in the report)."""

    reduce_range: bool
    weight_max: int  # largest |int8 weight| the encoding produces
    reason: str
    target: str
    target_features: str
    target_saturates: bool
    host_features: str
    host_saturates: bool
    requested: bool | None
    warning: str | None = None

    def as_notes(self) -> dict[str, Any]:
        return asdict(self)


def saturates(profile: DeviceProfile) -> bool:
    """Whether full-range u8s8 int8 saturates on ``profile``'s CPU kernels."""
    return profile.kind == "cpu" and u8s8_saturates(profile.architecture, profile.isa_features)


def choose_int8_encoding(
    requested: bool | None,
    *,
    weight_type: str,
    target: DeviceProfile | None,
    host: DeviceProfile,
) -> Int8Encoding:
    """The ``reduce_range`` choice for an int8 pass (see the module docstring for the rules).

    ``target`` None means the job targets the host itself.
    """
    tgt = target or host
    tgt_sat, host_sat = saturates(tgt), saturates(host)
    same = tgt is host or tgt.name == "host"
    tgt_feats = describe(tgt.architecture, tgt.isa_features)

    def encoding(reduce_range: bool, reason: str, warning: str | None = None) -> Int8Encoding:
        return Int8Encoding(
            reduce_range=reduce_range,
            weight_max=REDUCED_INT8_MAX if reduce_range else FULL_INT8_MAX,
            reason=reason, target=tgt.name, target_features=tgt_feats, target_saturates=tgt_sat,
            host_features=describe(host.architecture, host.isa_features),
            host_saturates=host_sat, requested=requested, warning=warning)

    why_sat = ("ONNX Runtime's u8s8 kernels use vpmaddubsw there (no VNNI/AMX), whose int16 "
               "pair sums saturate with full-range int8 weights")
    if requested is not None:
        warning = None
        if not requested and weight_type == "int8" and tgt_sat:
            warning = (f"reduce_range=false was requested for {tgt.name}, where {why_sat}: "
                       "accuracy on that target can be far below what full-range int8 promises")
        elif not requested and weight_type == "int8" and host_sat and not same:
            warning = ("reduce_range=false was requested and this host has no VNNI/AMX: the "
                       f"fidelity measured here includes int16 saturation {tgt.name} does not have")
        return encoding(bool(requested), "requested in the recipe", warning)
    if weight_type != "int8":
        return encoding(False, "uint8 weights: u8u8 kernels widen to 16 bits before "
                        "multiplying and do not saturate")
    if tgt_sat:
        return encoding(True, f"7-bit weights for {tgt.name} ({tgt_feats}): {why_sat}")
    if host_sat and not same:
        return encoding(True, f"7-bit weights: {tgt.name} does not saturate, but the host that "
                        "measures this job does (no VNNI/AMX); full-range weights would make "
                        "the reported fidelity the host's clipped arithmetic. Set "
                        "reduce_range=false to trade that for one more bit on the target")
    return encoding(False, f"full-range int8 weights: {tgt.name} accumulates int8 products in "
                    "32 bits (VNNI/AMX/Arm dot products or a non-CPU runtime)")
