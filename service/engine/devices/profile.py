"""``DeviceProfile``: what a compression target is, what runs fast on it, and how fast.

The cost model (``service.engine.cost_model``) reads the numbers; the auto search
(``service.engine.search``) reads the precisions and quantization formats to choose which
candidates to build. Every number of a catalogue profile names its public source in ``sources``
(key = field path such as ``"peak_gops.int8"``), so a user can check where it came from.

This module imports only pydantic and the standard library: the API imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.engine.devices.features import kernel_features

Precision = Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int16", "int4"]

# Quantization formats a device can run fast. The auto search maps each to a recipe:
# - int8_static_qdq_u8s8: QDQ, uint8 asymmetric activations, int8 per-channel weights
#   (ONNX Runtime CPU default; fast with VNNI/AMX or Arm dot-product).
# - int8_static_qdq_s8s8: QDQ, int8 symmetric activations and weights (TensorRT requires
#   symmetric int8; XNNPACK prefers signed).
# - int8_static_qdq_u8u8: QDQ, uint8 activations and uint8 weights (QNN HTP).
# - int16_static_qdq_u16u8: QDQ, uint16 activations, uint8 weights (QNN HTP "w8a16").
# - int8_dynamic: int8 weights, activations quantized at run time (ORT CPU MatMul/LSTM/GRU).
# - int8_reduce_range: 7-bit weights for x86 without VNNI (u8s8 pmaddubsw saturates otherwise).
# - int4_weight_only: MatMulNBits block-wise int4 weights (ORT CPU and CUDA).
# - fp16, bf16: half-precision weights and compute.
# - sparse_2_4: 2:4 semi-structured sparsity run by sparse tensor cores (Ampere and later).
QuantFormat = Literal[
    "int8_static_qdq_u8s8",
    "int8_static_qdq_s8s8",
    "int8_static_qdq_u8u8",
    "int16_static_qdq_u16u8",
    "int8_dynamic",
    "int8_reduce_range",
    "int4_weight_only",
    "fp16",
    "bf16",
    "sparse_2_4",
]

# Fields whose values are numbers from a datasheet; catalogue profiles must source each one.
NUMERIC_FIELDS = ("memory_mb", "storage_budget_mb", "memory_bandwidth_gbps", "typical_power_w")
# The cost model's efficiency constants a profile may set for itself (``cost_constants``).
COST_CONSTANTS = ("compute_efficiency", "memory_efficiency", "cache_bandwidth_factor",
                  "node_overhead_s")


class DeviceProfile(BaseModel):
    """A compression target (immutable).

    ``peak_gops`` is the peak throughput per precision in GFLOP/s (floating point) or GOP/s
    (integer), dense (no sparsity credit). ``quant_formats`` lists what the target's runtime
    executes fast (see the module comment for the vocabulary); ``static_shapes`` says the
    runtime needs fixed input shapes (QNN HTP, NNAPI, CoreML on the Neural Engine).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$",
        description="Stable identifier used in job requests (lowercase, digits, '_' or '-').",
    )
    title: str = Field(min_length=1, max_length=200, description="Human-readable name.")
    kind: Literal["cpu", "gpu", "npu"] = Field(description="Processor that runs the model.")
    vendor: str = Field(min_length=1, max_length=100)
    architecture: Literal["x86_64", "arm64", "cuda", "other"] = Field(
        description="Instruction set or programming model of the processor that runs the model."
    )
    isa_features: tuple[str, ...] = Field(
        default=(),
        description="ISA / hardware features that matter for inference (avx512_vnni, amx_int8, dotprod, tensor_cores, ...).",
    )
    execution_providers: tuple[str, ...] = Field(
        min_length=1, description="ONNX Runtime execution providers, preferred first."
    )
    precisions: tuple[Precision, ...] = Field(
        min_length=1, description="Compute precisions that run fast (natively) on this target."
    )
    quant_formats: tuple[QuantFormat, ...] = Field(
        default=(), description="Quantization formats the runtime executes fast, preferred first."
    )
    static_shapes: bool = Field(
        default=False, description="The runtime needs static input shapes (no dynamic dims)."
    )
    cores: int | None = Field(
        default=None, gt=0,
        description="CPU cores the runtime uses for one inference (CPU targets; latency is "
        "measured at this many threads, capped by the host's, where the host runs the "
        "target's kernels).",
    )
    memory_mb: float = Field(gt=0, description="Memory available to the model (MB).")
    storage_budget_mb: float = Field(gt=0, description="Storage budget for model files (MB).")
    peak_gops: dict[Precision, float] = Field(
        description="Peak dense throughput per precision, GFLOP/s or GOP/s."
    )
    memory_bandwidth_gbps: float = Field(gt=0, description="Peak memory bandwidth, GB/s.")
    typical_power_w: float = Field(gt=0, description="Typical power under inference load, W.")
    cost_constants: dict[str, float] = Field(
        default_factory=dict,
        description="This device's values of the cost model's efficiency constants "
        "(compute_efficiency, memory_efficiency, cache_bandwidth_factor, node_overhead_s), "
        "replacing the defaults for its kind; each sourced like the other numbers (catalogue "
        "profiles: derived in service/engine/devices/cost_sources.json).",
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Public source (URL or document) per numeric field, keyed by field path.",
    )
    notes: str = Field(default="", max_length=2000)

    @field_validator("peak_gops")
    @classmethod
    def _positive_peaks(cls, value: dict[str, float]) -> dict[str, float]:
        if "fp32" not in value:
            raise ValueError("peak_gops must give at least fp32")
        for precision, gops in value.items():
            if not gops > 0:
                raise ValueError(f"peak_gops[{precision}] must be > 0")
        return value

    @field_validator("cost_constants")
    @classmethod
    def _known_constants(cls, value: dict[str, float]) -> dict[str, float]:
        for name, number in value.items():
            if name not in COST_CONSTANTS:
                raise ValueError(f"cost_constants: unknown constant {name!r} "
                                 f"(known: {', '.join(COST_CONSTANTS)})")
            if not number > 0:
                raise ValueError(f"cost_constants[{name}] must be > 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        missing = [p for p in self.precisions if p not in self.peak_gops]
        if missing:
            raise ValueError(f"precisions without a peak_gops entry: {', '.join(missing)}")
        return self

    def missing_sources(self) -> list[str]:
        """Numeric field paths that have no entry in ``sources`` (catalogue profiles need none)."""
        wanted = (list(NUMERIC_FIELDS) + [f"peak_gops.{p}" for p in self.peak_gops]
                  + [f"cost_constants.{c}" for c in self.cost_constants])
        return [key for key in wanted if not self.sources.get(key)]

    def peak(self, precision: str) -> float:
        """Peak GOP/s for ``precision``; a precision the target lacks runs at fp32 speed."""
        return self.peak_gops.get(precision, self.peak_gops["fp32"])  # type: ignore[call-overload]

    def same_kernels_as(self, other: DeviceProfile) -> bool:
        """Whether ONNX Runtime runs the same CPU kernels on both (so a measurement on one
        stands for the other): CPUs of one architecture with equal kernel-selecting features
        (AVX2 / AVX-512 / VNNI / AMX / dot-product / i8mm / fp16 arithmetic)."""
        return (self.kind == other.kind == "cpu" and self.architecture == other.architecture
                and kernel_features(self.architecture, self.isa_features)
                == kernel_features(other.architecture, other.isa_features))

    def runs_fast(self, fmt: str) -> bool:
        """Whether ``fmt`` (a quantization format or a precision) is fast on this target."""
        return fmt in self.quant_formats or fmt in self.precisions
