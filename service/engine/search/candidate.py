"""A search candidate (one recipe and what came of it) and the mixed-precision records.

The leaf of the search package: every other module of ``service.engine.search`` uses these
types, and this one imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from service.engine.result import PipelineResult


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
    result: PipelineResult | None = None  # not serialised

    def to_dict(self) -> dict:
        return {
            "name": self.name, "recipe": self.recipe, "formats": self.formats,
            "reason": self.reason, "status": self.status, "error": self.error,
            "metrics": self.metrics, "violations": self.violations,
            "meets_constraints": self.status == "ok" and not self.violations,
            "mixed_precision": self.mixed_precision,
        }



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


