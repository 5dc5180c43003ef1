"""Typed settings of the training passes (light: pydantic only, safe for the API process)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LayerOp = Literal["Conv", "Gemm", "MatMul"]
LAYER_OPS: tuple[LayerOp, ...] = ("Conv", "Gemm", "MatMul")


class TrainingBudget(BaseModel):
    """How long and how hard to train (part of every training pass's config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(300, ge=1, le=100_000, description="optimizer steps at most")
    max_seconds: float = Field(
        120.0, gt=0, le=24 * 3600, description="wall-clock seconds at most (checked every step)"
    )
    batch_size: int = Field(64, ge=1, le=4096, description="samples per step")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate")
    seed: int = Field(0, description="seed for the batch order and torch's generator")
    threads: int = Field(
        1,
        ge=1,
        le=64,
        description="torch CPU threads while training; 1 by default because small models "
        "train slower (up to 30x measured) with threads competing on a shared host",
    )


class FeaturePair(BaseModel):
    """An intermediate tensor of the student matched (MSE) to one of the teacher."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student: str = Field(description="tensor name in the student graph")
    teacher: str = Field(description="tensor name in the (first) teacher graph, same shape")


class DistillationSettings(BaseModel):
    """Loss and budget of a distillation run (shared by distill, recovery rounds and QAT)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(4.0, gt=0, le=100, description="softening temperature T")
    soft_weight: float = Field(1.0, ge=0, description="weight of the teacher-matching loss")
    hard_weight: float = Field(
        0.5, ge=0, description="weight of cross-entropy on the dataset labels (when present)"
    )
    loss: Literal["auto", "kl", "mse"] = Field(
        "auto", description="output matching: KL on softened logits, MSE, or auto by shape"
    )
    features: list[FeaturePair] = Field(
        default_factory=list, description="intermediate tensors to match (feature distillation)"
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature-matching loss")
    preserve_sparsity: bool = Field(
        True, description="weights that are exactly zero (pruned) stay zero while training"
    )
    min_samples: int = Field(32, ge=1, description="fewer dataset samples than this is an error")
    budget: TrainingBudget = Field(default_factory=lambda: TrainingBudget.model_validate({}))


class RecoverySettings(DistillationSettings):
    """Distillation between pruning rounds (teacher: the model before pruning). Smaller budget."""

    budget: TrainingBudget = Field(
        default_factory=lambda: TrainingBudget.model_validate(
            {"max_steps": 150, "max_seconds": 60.0}
        )
    )
