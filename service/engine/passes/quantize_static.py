"""``quantize_static``: int8 QDQ with calibrated activation ranges (CNNs, CPU and NPU targets).

The normalised model first goes through ONNX Runtime's own pre-processing,
``onnxruntime.quantization.shape_inference.quant_pre_process`` (symbolic shape inference, ONNX
shape inference, ONNX Runtime's basic graph optimisation: Conv+BatchNormalization and
MatMul+Add fusions, constant folding), as its documentation recommends before quantization;
when that fails (graphs its symbolic shape inference cannot follow), plain ONNX shape
inference instead, and the notes say why (``pre_process``). Then ONNX Runtime's static quantizer
inserts
QuantizeLinear/DequantizeLinear pairs around the ops it supports, with per-channel int8 weights
by default. A ``Relu`` after a quantized ``Conv`` is absorbed into the activation range, and ONNX
Runtime runs each ``DQ -> Conv -> Q`` group as one int8 convolution (VNNI/AMX kernels on x86).

Calibration data comes from ``ctx.dataset`` (the user's ``.npz``, fed in the model's own batch:
one sample at a time where the batch is fixed) or, when none was given, is generated with a
seed of its own (never the evaluation rows) from the pipeline's resolved input plan
(``ctx.inputs``: the shapes the model runs on), else from the input signature. Without a
dataset, a graph with BatchNormalization layers is calibrated on ZeroQ's distilled data (Cai
et al., CVPR 2020; ``training.distilled_data``): the generated inputs optimised until every
BatchNorm layer sees the statistics it stores; a graph without (BatchNorm folded at export) on
the generated inputs as they are, which give only rough ranges. The report says which one was
used (``ctx.notes["calibration"]``, ``ctx.notes["data_free"]``).

Weights inside If/Loop/Scan bodies, which ONNX Runtime's static quantizer does not visit, are
stored as int8 + DequantizeLinear (``subgraph_weights``).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.graph import ensure_opset, iter_graphs, toposort
from service.engine.int8 import weight_only_int8
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import ScopeConfig, nodes_to_exclude_field


class QuantizeStaticConfig(ScopeConfig):
    """Static int8 quantization in QDQ format with calibrated activations."""

    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax",
        description="How activation ranges are chosen from calibration data: minmax (full "
        "range), entropy (KL-divergence optimal clipping), percentile (clip outliers).",
    )
    percentile: float = Field(
        99.999, gt=90.0, le=100.0, description="Percentile kept by the percentile method."
    )
    calibration_samples: int = Field(
        128, ge=1, le=4096, description="Samples used for calibration (dataset or generated)."
    )
    generated_dim: int = Field(
        16,
        ge=1,
        le=4096,
        description="Size given to symbolic non-batch dims when calibration data is generated.",
    )
    per_channel: bool = Field(
        True, description="One weight scale per output channel (accuracy for CNNs)."
    )
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8",
        description="Activation type: uint8 suits x86 (u8s8 VNNI kernels), int8 suits ARM, GPUs "
        "and most NPUs.",
    )
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Weight type.")
    symmetric_activations: bool = Field(
        False, description="Force zero-point 0 for activations (some NPUs need it)."
    )
    symmetric_weights: bool = Field(True, description="Force zero-point 0 for weights.")
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights: avoids int16 saturation on x86 CPUs without VNNI/AMX. None "
        "= chosen for the job's target and measuring host (recorded in the notes).",
    )
    quant_format: Literal["qdq", "qoperator"] = Field(
        "qdq",
        description="qdq (QuantizeLinear/DequantizeLinear around float ops, portable, preferred "
        "by ONNX Runtime and NPU toolchains) or qoperator (QLinearConv etc.).",
    )
    op_types: list[str] | None = Field(
        None,
        description="Op types to quantize (e.g. ['Conv', 'MatMul']); None = every op ONNX "
        "Runtime can quantize statically.",
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field()
    subgraph_weights: Literal["int8_weight_only", "keep_float"] = Field(
        "int8_weight_only",
        description="Weights inside If/Loop/Scan bodies: int8 + DequantizeLinear, or float.",
    )
    data_free: Literal["bn_statistics", "noise"] = Field(
        "bn_statistics",
        description="Without a dataset: bn_statistics = calibration inputs optimised to match "
        "the BatchNorm statistics the model stores (ZeroQ, Cai et al., CVPR 2020; noise when "
        "the graph has no BatchNorm), noise = generated inputs as they are.",
    )
    data_free_labels: bool = Field(
        True,
        description="With bn_statistics, where the output is class scores ([batch, classes] "
        "from a Gemm/MatMul head): each synthesised input is also optimised towards a target "
        "class (the BatchNorm statistics say nothing about the layers after the last "
        "BatchNorm; without it the head's ranges are calibrated on low-confidence scores).",
    )
    data_free_seconds: float = Field(
        30.0, gt=0.0, le=600.0, description="Time bound of the BatchNorm-statistics synthesis."
    )
    pre_process: Literal["auto", "shapes", "off"] = Field(
        "auto",
        description="ONNX Runtime's quant_pre_process first: auto = shape inference and its "
        "basic graph optimisation (fusions; shapes only when nodes_to_exclude or op_types "
        "name what fusions would rename), shapes = shape inference only, off = plain ONNX "
        "shape inference. A failure falls back to plain ONNX shape inference.",
    )


def _signature(model: onnx.ModelProto) -> list[tuple[str, int, list[int | str | None]]]:
    """(name, elem_type, dims) of every real graph input (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out.append((vi.name, tt.elem_type, dims))
    return out


# A fixed seed of calibration's own: generated calibration rows are never the evaluation rows
# (those use seed 0).
CALIBRATION_SEED = 1


def _calibration_feeds(
    model: onnx.ModelProto, config: QuantizeStaticConfig, ctx: PassContext, group: int
) -> tuple[list[dict[str, np.ndarray]], int, str]:
    """(feeds, samples, source): ``group`` samples per feed where the batch is dynamic."""
    from service.engine.dataset import split_feeds
    from service.engine.inputs import default_plan

    names = [n for n, _, _ in _signature(model)]
    if ctx.dataset is None:
        plan = ctx.inputs or default_plan(model, dynamic_dim=config.generated_dim)
        feeds = plan.feeds(config.calibration_samples, CALIBRATION_SEED)
        if config.data_free == "bn_statistics":
            distilled, note = _distil(model, feeds[:DISTILLED_SAMPLES], config)
            ctx.notes["data_free"] = note
            if distilled is not None:
                return distilled, len(distilled), "synthesised"
        return feeds, len(feeds), "generated"
    missing = [n for n in names if n not in ctx.dataset]
    if missing:
        raise EngineError(
            "invalid_dataset",
            f"the dataset has no array for model input(s) {', '.join(missing)}; "
            f"it must hold one array per input: {', '.join(names)}",
        )
    data = {n: np.asarray(ctx.dataset[n])[: config.calibration_samples] for n in names}
    feeds, _ = split_feeds(model, data, None, config.calibration_samples, group=group)
    return feeds, next(iter(data.values())).shape[0] if data else 0, "dataset"


def _pre_process(
    model: onnx.ModelProto, config: QuantizeStaticConfig, ctx: PassContext
) -> onnx.ModelProto:
    """ONNX Runtime's quant_pre_process where it works, else plain ONNX shape inference.

    Its optimisation step fuses MatMul+Add into Gemm and renames fused nodes: with
    ``nodes_to_exclude`` or ``op_types`` given (names and op types must stay what the caller
    saw), only its shape inference runs."""
    names_matter = bool(config.nodes_to_exclude or config.op_types)
    mode = "shapes" if config.pre_process == "auto" and names_matter else config.pre_process
    note: dict = {"mode": mode}
    if mode != "off":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src, dst = ctx.workdir / "pre_in.onnx", ctx.workdir / "pre_out.onnx"
        onnx.save_model(model, str(src))
        try:
            # When its symbolic shape inference gives up, it saves the half-inferred model
            # into the current directory (sym_shape_infer_temp.onnx and its weights): keep
            # that inside the pass's workdir (the engine runs one job per process).
            with contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(ctx.workdir):
                quant_pre_process(str(src), str(dst), skip_optimization=mode == "shapes")
            processed = onnx.load(str(dst))
            onnx.checker.check_model(processed)
        except Exception as exc:  # its failure is not the pass's: quantize without it
            note.update({"applied": False, "fallback": "onnx shape inference",
                         "reason": f"{type(exc).__name__}: "
                                   f"{str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"})
        else:
            note.update({"applied": True, "nodes_before": len(model.graph.node),
                         "nodes_after": len(processed.graph.node),
                         "optimised": mode == "auto"})
            ctx.notes["pre_process"] = note
            return processed
    else:
        note["applied"] = False
    ctx.notes["pre_process"] = note
    # Shape inference helps the quantizer; a model it cannot infer still quantizes.
    with contextlib.suppress(Exception):
        model = onnx.shape_inference.infer_shapes(model)
    return model


DISTILLED_SAMPLES = 32  # ZeroQ's batch of distilled data (16 measured worse on digits)


def _distil(
    model: onnx.ModelProto, template: list[dict[str, np.ndarray]], config: QuantizeStaticConfig
) -> tuple[list[dict[str, np.ndarray]] | None, dict]:
    """ZeroQ distilled data (``training.distilled_data``); None with the reason when torch or
    BatchNorm statistics are not there."""
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return None, {"reason": "the graph has no BatchNormalization layer (folded into the "
                                "convolutions at export): no statistics to match"}
    try:
        from service.engine.training.distilled_data import distil_inputs
    except ImportError as exc:  # the worker image has torch; a bare engine may not
        return None, {"reason": f"torch is not installed ({exc.name})"}
    return distil_inputs(model, template, max_seconds=config.data_free_seconds,
                         seed=CALIBRATION_SEED, labels=config.data_free_labels)


class _Reader:
    """CalibrationDataReader over ready feeds, one per call."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._feeds):
            return None
        self._pos += 1
        return self._feeds[self._pos - 1]

    def rewind(self) -> None:
        self._pos = 0


@register
class QuantizeStatic(Pass[QuantizeStaticConfig]):
    """Static int8 (QDQ) quantization with calibration."""

    name = "quantize_static"
    config_model = QuantizeStaticConfig
    quantizes = True
    calibrates = True
    trains = False
    scoped = True
    description = (
        "int8 QDQ with per-channel weights and calibrated activation ranges (minmax, entropy, "
        "percentile) from the uploaded dataset, else from inputs distilled from the model's "
        "BatchNorm statistics (ZeroQ) or generated, after ONNX Runtime's "
        "quant_pre_process where it works; the fast int8 path for CNNs."
    )

    def run(
        self, model: onnx.ModelProto, config: QuantizeStaticConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        base = ensure_opset(model)
        # Histogram methods keep every value: feed them a few samples at a time.
        group = 16 if config.calibration_method == "minmax" else 4
        # Before pre-processing: its fusions fold the BatchNorm layers data-free calibration
        # reads its statistics from (the inputs are the same either way).
        feeds, samples, source = _calibration_feeds(base, config, ctx, group)
        work = _pre_process(base, config, ctx)
        ctx.notes["calibration"] = {
            "source": source,
            "samples": int(samples),
            "method": config.calibration_method,
        }
        if source == "generated":
            ctx.notes["calibration"]["warning"] = (
                "activation ranges come from random inputs, not real data: upload a dataset "
                "for accurate static quantization"
            )
        elif source == "synthesised":
            ctx.notes["calibration"]["method_data"] = ctx.notes["data_free"]["method"]
            ctx.notes["calibration"]["warning"] = (
                "activation ranges come from inputs synthesised to match the model's BatchNorm "
                "statistics (no dataset): upload a dataset for the most accurate ranges"
            )

        class Reader(_Reader, CalibrationDataReader):
            pass

        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        qtypes = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        extra: dict = {
            "ActivationSymmetric": config.symmetric_activations,
            "WeightSymmetric": config.symmetric_weights,
        }
        if config.calibration_method == "percentile":
            extra["CalibPercentile"] = config.percentile
        encoding = ctx.int8_encoding(config.reduce_range, config.weight_type)
        ctx.notes["encoding"] = encoding.as_notes()
        src, dst = ctx.workdir / "qs_in.onnx", ctx.workdir / "qs_out.onnx"
        onnx.save_model(work, str(src))
        ctx.progress(
            0.2, f"calibrating on {samples} {source} samples ({config.calibration_method})"
        )
        try:
            # The histogram calibrators print progress to stdout: keep the worker's output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(src),
                    str(dst),
                    Reader(feeds),
                    quant_format=QuantFormat.QDQ
                    if config.quant_format == "qdq"
                    else QuantFormat.QOperator,
                    op_types_to_quantize=config.op_types,
                    per_channel=config.per_channel,
                    reduce_range=encoding.reduce_range,
                    activation_type=qtypes[config.activation_type],
                    weight_type=qtypes[config.weight_type],
                    nodes_to_exclude=list(config.nodes_to_exclude),
                    calibrate_method=methods[config.calibration_method],
                    extra_options=extra,
                )
        except EngineError:
            raise
        except Exception as exc:  # library failure -> pass failure, with its reason
            raise EngineError(
                "pass_failed",
                "ONNX Runtime's static quantizer failed: " + str(exc).strip().splitlines()[0][:300],
            ) from None
        out = onnx.load(str(dst))
        # ONNX Runtime's quantizer appends the QDQ pair of a tensor that an If/Loop body reads
        # from the outer scope after that node: sort again (bodies' outer reads count).
        reordered = toposort(out)
        ctx.check_cancelled()

        # What was quantized: ops with a dequantized weight, or whose dequantized inputs and
        # quantized outputs make an int8 group ONNX Runtime fuses; QLinear* ops (QOperator).
        dq_outputs = {
            o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output
        }
        q_inputs = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
        quantized: Counter[str] = Counter()
        for node in out.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            weight_dq = len(node.input) > 1 and node.input[1] in dq_outputs
            group = any(i in dq_outputs for i in node.input) and any(
                o in q_inputs for o in node.output
            )
            if node.op_type.startswith("QLinear") or node.op_type == "QGemm" or weight_dq or group:
                quantized[node.op_type] += 1
        inits = {t.name: t for t in out.graph.initializer}
        float_weight_nodes = [
            {"node": n.name, "op": n.op_type}
            for n in out.graph.node
            if any(
                i in inits
                and inits[i].data_type == TensorProto.FLOAT
                and len(inits[i].dims) >= 2
                and int(np.prod(inits[i].dims)) >= 1024
                for i in n.input
            )
        ]
        notes: dict = {
            "quantized_ops": dict(quantized),
            "float_ops_with_weights": float_weight_nodes,
            "excluded": list(config.nodes_to_exclude),
            "per_channel": config.per_channel,
            "activation_type": config.activation_type,
            "weight_type": config.weight_type,
            "format": config.quant_format,
            "nodes_reordered": reordered,
        }
        if config.subgraph_weights == "int8_weight_only" and len(list(iter_graphs(out.graph))) > 1:
            done, skipped = weight_only_int8(
                out,
                {"MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Attention"},
                min_elements=1024,
                exclude=set(config.nodes_to_exclude),
                main_graph=False,
                subgraphs=True,
            )
            notes["subgraph_weight_only_int8"] = done
            notes["subgraph_skipped"] = skipped
        recurrent = sorted(
            {n["op"] for n in float_weight_nodes if n["op"] in ("LSTM", "GRU", "RNN")}
        )
        if recurrent:
            notes["hint"] = (
                f"{', '.join(recurrent)} have no static int8 (QDQ) kernels and stay float: "
                "add a quantize_dynamic step for them"
            )
        notes["debug_metadata_bytes_removed"] = strip_debug_metadata(out)
        ctx.notes.update(notes)
        if not quantized and not notes.get("subgraph_weight_only_int8"):
            present = sorted({n.op_type for n in model.graph.node})
            raise EngineError(
                "no_effect",
                "static quantization found no op to quantize"
                + (f" among {config.op_types}" if config.op_types else "")
                + f" (the model's ops: {', '.join(present[:15])})",
            )
        return out
