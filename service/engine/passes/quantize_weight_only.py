"""``quantize_weight_only``: int8 weights + DequantizeLinear, every op computing in float.

The candidate that needs no activation statistics and no int8 kernels: every large float
weight of the chosen op types (MatMul, Gemm, Conv, ConvTranspose, LSTM, GRU, RNN, Attention,
embedding tables read by Gather), in the main graph and inside If/Loop/Scan bodies, is stored
as int8 with one scale per output channel and a ``DequantizeLinear`` in front of its reader
(embedding tables of the main graph: int8 rows with one scale per row, dequantized after the
lookup, ``int8.gather_rows_int8``). The file shrinks about 4x for those weights and
the arithmetic stays float, so fidelity is that of 8-bit weight rounding alone, with any data
or none, on any device that runs ONNX.

Speed: ONNX Runtime's default session runs the DequantizeLinear nodes at every inference
(usually a little slower than the float model). Loaded with the session option
``session.disable_quant_qdq=1`` they are constant-folded at load instead: the original float
speed, with the small file. The pass says so in its notes (``load_hint``, and
``session_config``: the entries that fold them); the recipe job then measures the result under
both sessions and reports which one its speed assumes.

A model whose weights stay in external data (past the engine's inline limit, or 2 GiB) is
quantized one weight at a time (``service.engine.weight_stream.int8_weight_only``): MatMul,
Gemm and main-graph Gather tables; the other op types stay float on that path.

Shares ``service.engine.int8.weight_only_int8`` with ``quantize_dynamic`` (which uses it for
GRU and subgraph weights); what this pass adds is using it for every op, as a pass of its own.
"""

from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.graph import ensure_opset, float_weight_bytes
from service.engine.int8 import gather_rows_int8, weight_only_int8
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import SMALLER_RATIO, Pass, PassContext, register
from service.engine.scope import ScopeConfig, nodes_to_exclude_field, scope_of

WeightOp = Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Attention",
                   "Gather"]
_ALL: tuple[WeightOp, ...] = ("MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN",
                              "Attention", "Gather")

FOLD_AT_LOAD = {"session.disable_quant_qdq": "1"}  # ONNX Runtime folds constant DQ at load
LOAD_HINT = ("DequantizeLinear runs at every inference in ONNX Runtime's default session; "
             "create the session with SessionOptions.add_session_config_entry("
             "'session.disable_quant_qdq', '1') to fold the weights at load and run at the "
             "float model's speed")


class QuantizeWeightOnlyConfig(ScopeConfig):
    """Weight-only int8: which ops, how small a weight stays float, which nodes stay float."""

    op_types: list[WeightOp] = Field(
        default_factory=lambda: list(_ALL),
        description="Op types whose constant weights are stored int8 (Gather: embedding tables).",
    )
    min_elements: int = Field(
        1024, ge=1, description="Weights with fewer elements stay float (not worth a scale)."
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field()
    subgraphs: bool = Field(True, description="Also weights inside If/Loop/Scan bodies.")


@register
class QuantizeWeightOnly(Pass[QuantizeWeightOnlyConfig]):
    """int8 weights, float compute (no calibration, no int8 kernels needed)."""

    name = "quantize_weight_only"
    config_model = QuantizeWeightOnlyConfig
    quantizes = True
    calibrates = False
    trains = False
    scoped = True
    streams = True
    description = (
        "int8 weights with a DequantizeLinear in front, float compute: ~4x smaller weights "
        "with no data and no int8 kernels (also inside If/Loop bodies and embedding tables)"
    )

    def run(
        self, model: onnx.ModelProto, config: QuantizeWeightOnlyConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.external import has_external

        if has_external(model):
            return _run_streaming(model, config, ctx)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        work = ensure_opset(work)
        bytes_before = model.ByteSize()
        exclude = set(scope_of(config).nodes_to_exclude)
        done: list[dict] = []
        skipped: list[dict] = []
        if "Gather" in config.op_types:  # main-graph tables: only the rows looked up dequantize
            done, skipped = gather_rows_int8(work, min_elements=config.min_elements,
                                             exclude=exclude)
        more, more_skipped = weight_only_int8(
            work, set(config.op_types), min_elements=config.min_elements,
            exclude=exclude, main_graph=True, subgraphs=config.subgraphs,
            per_channel=True, symmetric=True,
            skip_nodes={name for item in done for name in item["lookups"]},
        )
        done, skipped = done + more, skipped + more_skipped
        debug_bytes = strip_debug_metadata(work)
        bytes_after = work.ByteSize()
        ctx.notes.update({
            "weight_only_int8": done,
            "skipped": skipped,
            "op_types": sorted(config.op_types),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "float_weight_bytes_left": float_weight_bytes(work),
            "load_hint": LOAD_HINT,
            "session_config": dict(FOLD_AT_LOAD),
        })
        if not done:
            raise EngineError(
                "no_effect",
                "no float weight of at least "
                f"{config.min_elements} elements in {', '.join(sorted(config.op_types))} nodes",
                {"skipped": skipped[:50]},
            )
        if bytes_after + debug_bytes > SMALLER_RATIO * bytes_before:
            raise EngineError(
                "no_effect",
                f"weight-only int8 barely changed the model ({bytes_before} -> {bytes_after} "
                "bytes): its bytes are not in weights of the chosen ops",
                {"bytes_before": bytes_before, "bytes_after": bytes_after},
            )
        ctx.progress(1.0, f"{len(done)} weights stored int8")
        return work


def _run_streaming(
    model: onnx.ModelProto, config: QuantizeWeightOnlyConfig, ctx: PassContext
) -> onnx.ModelProto:
    """The pass on a model kept in external data: int8 one weight at a time."""
    from service.engine.weight_stream import int8_weight_only

    work = ensure_opset(model)
    scope = scope_of(config)
    exclude = {n.name for n in work.graph.node if scope.excludes(n.name)}
    result = int8_weight_only(work, ctx.workdir, op_types=set(config.op_types),
                              min_elements=config.min_elements, exclude=exclude,
                              check_cancelled=ctx.check_cancelled, progress=ctx.progress)
    ctx.notes.update({**result.notes(), "op_types": sorted(config.op_types),
                      "load_hint": LOAD_HINT, "session_config": dict(FOLD_AT_LOAD)})
    if not result.quantized:
        raise EngineError("no_effect", "no float weight of at least "
                          f"{config.min_elements} elements in MatMul, Gemm or Gather nodes",
                          {"skipped": result.skipped[:50]})
    if result.bytes_after > SMALLER_RATIO * result.bytes_before:
        raise EngineError(
            "no_effect",
            f"weight-only int8 barely changed the model ({result.bytes_before} -> "
            f"{result.bytes_after} bytes): its bytes are not in weights of the chosen ops",
            {"bytes_before": result.bytes_before, "bytes_after": result.bytes_after})
    return result.model
