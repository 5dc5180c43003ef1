"""``graph_optimize``: ONNX Runtime offline graph optimisation at a chosen level.

ONNX Runtime rewrites a graph when it opens a session; ``SessionOptions.optimized_model_filepath``
saves the rewritten graph so a deployment skips that work and, at higher levels, gets fusions
(Conv+Relu, MatMul+Add, attention, GELU, LayerNorm...) baked into the file.

Levels:

- ``basic``: constant folding, redundant node elimination, semantics-preserving rewrites of
  standard ONNX ops. The result is portable to any runtime.
- ``extended``: adds ONNX Runtime's fused contrib ops (``com.microsoft`` domain: FusedConv,
  FusedGemm, Gelu, SkipLayerNormalization...). Needs ONNX Runtime to run.
- ``layout`` / ``all``: adds layout transforms chosen for the CPU this runs on (e.g. NCHWc
  blocked convolutions for the host's AVX2/AVX-512 width). Such a file is tied to ONNX Runtime
  *and* to CPUs like the worker's: a smaller or older target may run it slower or not at all.

``ort_optimize`` is the ONNX Runtime call itself; the graph helpers every pass shares
(``iter_graphs``, ``op_histogram``, ``toposort``...) live in ``service.engine.graph``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.graph import op_histogram
from service.engine.registry import Pass, PassConfig, PassContext, register

OptLevel = Literal["basic", "extended", "layout", "all"]

_LEVEL_NOTES = {
    "basic": "portable: standard ONNX ops only",
    "extended": "uses ONNX Runtime contrib ops (com.microsoft): runs on ONNX Runtime only",
    "layout": "layout transforms for this host's CPU: tied to ONNX Runtime and similar CPUs",
    "all": "contrib ops and layout transforms for this host's CPU (e.g. NCHWc): tied to ONNX "
    "Runtime and to CPUs with the worker's vector width; re-optimise on the target if it differs",
}


# --------------------------------------------------------------------------- ONNX Runtime


def ort_optimize(
    model: onnx.ModelProto, level: OptLevel, workdir: Path, *, threads: int = 1
) -> onnx.ModelProto:
    """Return ``model`` as rewritten by ONNX Runtime's CPU provider at ``level``.

    Raises ``EngineError('pass_failed')`` when ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "layout": getattr(
            ort.GraphOptimizationLevel,
            "ORT_ENABLE_LAYOUT",
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ),
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"ort_optimize_{level}_in.onnx"
    dst = workdir / f"ort_optimize_{level}_out.onnx"
    onnx.save_model(model, str(src))
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(dst)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime warns about hardware-specific layouts on stderr at "all"; the notes say it.
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types; say what happened
        raise EngineError(
            "pass_failed",
            f"ONNX Runtime could not optimise the model at level {level!r}: "
            + str(exc).strip().splitlines()[0][:300],
        ) from None
    return onnx.load(str(dst))


# --------------------------------------------------------------------------- the pass


class GraphOptimizeConfig(PassConfig):
    """Offline ONNX Runtime graph optimisation."""

    level: OptLevel = Field(
        "extended",
        description="basic = portable constant folding and clean-ups; extended = plus ONNX "
        "Runtime fused contrib ops; layout/all = plus CPU-specific layouts (NCHWc), tied to "
        "CPUs like the worker's.",
    )


@register
class GraphOptimize(Pass[GraphOptimizeConfig]):
    """Bake ONNX Runtime's graph rewrites into the model file."""

    name = "graph_optimize"
    config_model = GraphOptimizeConfig
    quantizes = False
    calibrates = False
    trains = False
    scoped = False
    description = (
        "ONNX Runtime offline graph optimisation (fusions, constant folding) at a chosen level; "
        "extended/all produce files that need ONNX Runtime, all/layout are tuned to the host CPU."
    )

    def run(
        self, model: onnx.ModelProto, config: GraphOptimizeConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        before = op_histogram(model)
        ctx.progress(0.1, f"optimising at level {config.level}")
        out = ort_optimize(model, config.level, ctx.workdir)
        after = op_histogram(out)
        nodes_before, nodes_after = sum(before.values()), sum(after.values())
        fused = sorted(k for k in after if k not in before)
        removed = {k: v - after.get(k, 0) for k, v in before.items() if v > after.get(k, 0)}
        ctx.notes.update(
            {
                "level": config.level,
                "portability": _LEVEL_NOTES[config.level],
                "nodes_before": nodes_before,
                "nodes_after": nodes_after,
                "new_op_types": fused,
                "removed_ops": removed,
            }
        )
        if before == after and out.ByteSize() >= model.ByteSize():
            raise EngineError(
                "no_effect",
                f"ONNX Runtime found nothing to rewrite at level {config.level!r}: the graph "
                f"keeps its {nodes_before} nodes and op types (it is already optimised).",
                {"level": config.level, "nodes": nodes_before},
            )
        return out
