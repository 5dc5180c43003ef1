"""Constraints of a job (``constraints`` in the request): light, so the API validates them.

Auto mode searches for a candidate that meets them; the report of a fixed recipe states them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.engine.errors import EngineError


class AutoConstraints(BaseModel):
    """Constraints and objective of an auto job (``constraints`` in the job request).

    - ``max_size_mb``: model file size, MB = 10^6 bytes.
    - ``max_latency_ms`` with ``latency_on``: ``"target"`` (estimated on the device profile by
      the cost model; measured when the device is ``host``) or ``"host"`` (measured with ONNX
      Runtime on the worker). ``{"value": 5, "where": "host"}`` is accepted too.
    - ``max_accuracy_drop``: accuracy points lost on the dataset's labels (0.005 = half a point);
      needs a dataset with ``labels``.
    - ``min_fidelity`` with ``fidelity_metric``: cosine similarity of every output, or top-1
      agreement of the class output, against the original. Without either accuracy or fidelity
      constraint, ``min_fidelity`` = 0.99 (cosine) applies.
    - ``max_memory_mb``: estimated peak memory on the target (weights + live activations).
    - ``max_kl_divergence``: causal decoders (``service.engine.lm``): mean next-token KL
      divergence of the candidate from the original on held-out token sequences, in nats.
      A decoder without an accuracy, fidelity or perplexity constraint is held to
      ``max_kl_divergence`` = 0.02 (not the cosine default).
    - ``max_perplexity_increase``: causal decoders: relative perplexity increase on the held-out
      sequences (0.05 = perplexity at most 5 % above the original's).
    - ``min_decode_tokens_per_s``: causal decoders: decode tokens/s with the KV cache, measured
      on the worker (ONNX Runtime CPU, the job's threads), one token per step.
    - ``objective``: ``size``, ``latency`` or ``balanced`` (geometric mean of both ratios);
      candidates within 1 % of each other on it count as level and the more faithful wins
      (``search.score.better``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_size_mb: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    latency_on: Literal["target", "host"] = "target"
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_fidelity: float | None = Field(None, ge=-1, le=1)
    fidelity_metric: Literal["cosine", "top1"] = "cosine"
    max_memory_mb: float | None = Field(None, gt=0)
    max_kl_divergence: float | None = Field(
        None, gt=0, description="Decoders: mean next-token KL divergence from the original on "
        "held-out token sequences (nats).")
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Decoders: relative perplexity increase on held-out token "
        "sequences (0.05 = 5 %).")
    min_decode_tokens_per_s: float | None = Field(
        None, gt=0, description="Decoders: decode tokens/s with the KV cache, measured on the "
        "worker.")
    objective: Literal["size", "latency", "balanced"] = "balanced"
    max_candidates: int = Field(10, ge=1, le=40, description="Most candidates to build.")
    training: bool = Field(
        True, description="Include candidates that retrain (channel pruning recovered by "
        "distillation, 2:4 sparsity): smaller results, minutes instead of seconds.")
    workers: int | None = Field(None, ge=1, le=64, description="Parallel candidate processes.")

    @model_validator(mode="before")
    @classmethod
    def _latency_object(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("max_latency_ms"), dict):
            data = dict(data)
            spec = data.pop("max_latency_ms")
            data["max_latency_ms"] = spec.get("value")
            if "where" in spec:
                data["latency_on"] = spec["where"]
        return data


def parse_constraints(value: dict | None) -> AutoConstraints:
    """Validate a job's constraints; ``EngineError("invalid_constraints")`` with field errors."""
    try:
        return AutoConstraints.model_validate(value or {})
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "constraints",
                   "message": e["msg"]} for e in exc.errors()]
        raise EngineError("invalid_constraints", "invalid auto constraints",
                          {"errors": errors}) from None
