"""Request bodies of the API (pydantic). Responses are the records' own models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Constraints(BaseModel):
    """What the result must satisfy (auto mode searches for it; fixed recipes report it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_size_mb: float | None = Field(default=None, gt=0, description="Largest model file, MB.")
    max_latency_ms: float | None = Field(default=None, gt=0, description="Latency bound, ms.")
    latency_on: Literal["target", "host"] = Field(
        default="target", description="Estimate on the target device or measure on the host."
    )
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1, description="Largest accuracy drop (fraction), needs labels."
    )
    min_fidelity: float | None = Field(
        default=None, ge=-1, le=1, description="Smallest cosine similarity to the original."
    )
    min_top1_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Smallest top-1 agreement with the original."
    )
    max_memory_mb: float | None = Field(default=None, gt=0, description="Peak memory bound, MB.")
    objective: Literal["size", "latency", "balanced"] = Field(
        default="balanced", description="What auto mode optimises among candidates that fit."
    )


class JobCreate(BaseModel):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=64)
    device: str | dict[str, Any] = Field(
        default="host", description="A device name from /v1/devices or an inline profile."
    )
    recipe: list[dict[str, Any]] | Literal["auto"] = Field(
        description='Ordered passes [{"pass": name, ...params}] or "auto".'
    )
    constraints: Constraints = Field(default_factory=Constraints)
    dataset_id: str | None = Field(default=None, max_length=64)
    callback_url: str | None = Field(default=None, max_length=2048)
