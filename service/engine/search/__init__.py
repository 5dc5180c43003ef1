"""Auto mode: search compression candidates for a target device under constraints.

``run_auto`` (``service.engine.search.run``) is what ``compress(model, "auto")`` runs; its
docstring walks through the search. The modules: ``plan`` (what the model is made of, one
planner per device format), ``candidate`` (the types), ``score`` (metrics, constraint
violations, the objective), ``mixed_precision`` (per-layer sensitivity), ``holdout`` (held-out
evaluation), ``confirm`` (head-to-head latency) and ``report`` (Pareto front, the choice, the
failure naming the closest candidate).
"""

from service.engine.constraints import AutoConstraints, parse_constraints
from service.engine.search.candidate import Candidate, MixedPrecisionRecord
from service.engine.search.plan import PLANNERS, model_family, plan_candidates
from service.engine.search.report import pareto_front
from service.engine.search.run import run_auto

__all__ = [
    "PLANNERS", "AutoConstraints", "Candidate", "MixedPrecisionRecord", "model_family",
    "parse_constraints", "pareto_front", "plan_candidates", "run_auto",
]
