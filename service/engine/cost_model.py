"""A target cost model: FLOPs and bytes per node, a roofline latency, peak memory, energy.

``analyse(model)`` walks the graph once (device independent): for every node it finds the compute
precision the runtime will use (int8 when a QDQ pattern or an integer op feeds it, int4 for
``MatMulNBits``, fp16/bf16 from the tensor types, fp32 otherwise), the FLOPs (2 per multiply-add)
and the bytes it reads and writes at their stored precision. ``estimate(model, profile)`` turns
that into a latency on a ``DeviceProfile`` with a roofline per node::

    t(node) = max(flops / (peak[precision] * compute_eff), bytes / (bandwidth * memory_eff))
              + per-node overhead

A precision or QDQ format the profile does not list as fast runs at the fp32 rate, which is
what an execution provider that falls back does. On CPUs every node pays its memory traffic
and a dispatch overhead; on GPUs and NPUs the graph compiler (TensorRT, QNN, CoreML, OpenVINO)
fuses elementwise-like ops into a neighbouring kernel, so only kernel ops (``_KERNEL_OPS``:
convolutions, matmuls, recurrent cells, normalisations, pooling, ...) cost anything. Peak memory is the weights plus the largest set of
activations alive at once in topological order; energy is latency x typical power.

Dynamic dimensions are fixed for the estimate: the first axis of every input (batch) at
``DEFAULT_BATCH`` = 1, every other symbolic or unknown axis at ``DEFAULT_DYNAMIC_DIM`` = 128
(a sequence length); callers may pass ``input_shapes``. Subgraphs of If/Loop/Scan are counted
once (the larger branch of an If; one iteration of a Loop).

The efficiency constants (``Constants``) are the module defaults per device kind, each marked
FITTED, SOURCED or ASSUMPTION in its comment and listed with its derivation and sources in
``service/engine/devices/cost_sources.json``; a profile's own ``cost_constants`` (fitted to
published latencies by ``scripts/source_cost_constants.py``) replace them for that device
(``constants`` says ``sourced``); for CPUs that run the kernels of a machine
``scripts/check_cost_model.py`` was run on, the values it fitted there (least squares over the
test corpus, stored with their fit error in ``service/engine/devices/cost_fit.json``) replace the
CPU defaults (``constants_for``; an estimate says which in ``constants`` and its fit error in
``fit_error_pct``).

``calibrate_host(samples)`` fits the host's efficiency (a scale on the roofline time and a
per-node overhead) against ONNX Runtime latencies measured on this machine, so the report can
show predicted vs measured for the host. Imports only onnx and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.engine.devices import DeviceProfile, host_profile

# CONVENTION: estimates are for one inference (batch 1) with other symbolic axes at 128.
DEFAULT_BATCH = 1
DEFAULT_DYNAMIC_DIM = 128

# Every constant below carries a label, and service/engine/devices/cost_sources.json holds one
# row per constant and key with its value, derivation and sources (a test keeps the two equal):
# - FITTED: on CPU targets that run a fitted machine's kernels, ``constants_for`` replaces the
#   CPU values by the ones ``scripts/check_cost_model.py`` fitted there (least squares on ONNX
#   Runtime latencies of the test corpus measured on that machine; stored with their fit error
#   in ``service/engine/devices/cost_fit.json``, one fit per kind of machine, each run's output
#   under docs/bench/: cost_model.txt on an AMD EPYC, cost_model_xeon.txt on an Intel Xeon,
#   cost_model_xeon_amx.txt on an Intel Xeon with AMX). The CPU values here are the fallback
#   for other CPUs, FITTED too: one least-squares fit over every stored fit's measurements
#   (``scripts/fit_cpu_fallback.py``, stored as ``fallback`` in cost_fit.json with its error on
#   a machine left out of the fit, output docs/bench/cost_fallback.txt).
# - SOURCED: derived from published figures (a vendor page, a paper, a benchmark table), each
#   quoted with its URL in cost_sources.json. The GPU / NPU ones are derived by
#   ``scripts/source_cost_constants.py`` (output in docs/bench/cost_sources.txt): fitted to
#   published batch-1 latencies of standard networks, or taken from published bandwidth
#   microbenchmarks (GPUs) and LLM decode rates (NPUs); a device with values of its own carries
#   them in its profile's ``cost_constants``, which replace the kind defaults here.
# - MEASURED: measured on the machine the first CPU fit was made on (an AMD EPYC) by a
#   committed script, whose committed output holds the quoted figure
#   (scripts/measure_cpu_constants.py, docs/bench/cpu_constants.txt).
# - ASSUMPTION: no citable figure found (cost_sources.json lists the searches) and no such
#   device here to fit on (none left: an estimate that used one would say so).
# - EXACT / CONVENTION: follows from definitions / a stated choice.
#
# The latency model is the roofline (Williams, Waterman, Patterson, "Roofline: an insightful
# visual performance model for multicore architectures", CACM 52(4), 2009,
# https://doi.org/10.1145/1498765.1498785) per node, plus a dispatch overhead per node.
#
# Fraction of the datasheet peak that small-batch inference kernels reach.
# cpu: FITTED on hosts with the same kernels; the fallback for other CPUs is FITTED over all
# those hosts' measurements (scripts/fit_cpu_fallback.py; an estimate that uses it states the
# machines and the leave-one-machine-out error).
# gpu: SOURCED: the T4 fit to 6 published TensorRT latencies gives 0.317 (the A100's own value,
# 0.0814, is in its profile).
# npu: SOURCED: the median of the NPU profiles' own fits (Apple M2 0.137, Intel Core Ultra NPU
# 0.291, Snapdragon 8 Gen 3 0.326; each kept in its profile).
COMPUTE_EFFICIENCY = {"cpu": 1.0281, "gpu": 0.30, "npu": 0.291}
# Fraction of the datasheet memory bandwidth reached.
# cpu: FITTED (on the host's kernels; the fallback over every fitted machine).
# gpu: SOURCED: the median STREAM-triad fraction of the datasheet bandwidth over six NVIDIA
# GPUs (V100 to H200; 0.74-0.94, median 0.90) measured by te42kyfo/gpu-benches, derived by
# scripts/source_cost_constants.py (cost_sources.json, ``bandwidth``).
# npu: SOURCED: the median fraction of the datasheet DRAM bandwidth that three
# Snapdragon NPUs reach decoding Llama 1B / 3B / 8B at w4a16 (Qualcomm AI Hub's tokens/s; the
# slope of seconds per token against bytes per token: 0.33-0.82, median 0.72), derived by the
# same script (``llm_decode``).
MEMORY_EFFICIENCY = {"cpu": 0.6033, "gpu": 0.90, "npu": 0.72}
# Activation traffic is served mostly from caches: bandwidth relative to DRAM / HBM.
# cpu: MEASURED, L2-resident vs DRAM bandwidth of one core through ONNX Runtime's Add kernel
# (3.8x on the fitted host; not separable from the fitted memory efficiency, so
# ``fit_cpu_constants`` keeps it). gpu: SOURCED: the median L2 / DRAM ratio within one
# gpu-l2-cache run (4 MB vs 256 MB) over four NVIDIA GPUs (2.7-6.3, median 3.3), derived by the
# same script. npu: SOURCED: fitted jointly to the 9 published NPU latencies (each device's own
# constants refitted per candidate; least summed squared error at 1.57, rms 6.1 %), by the same
# script.
CACHE_BANDWIDTH_FACTOR = {"cpu": 3.8, "gpu": 3.3, "npu": 1.57}
# Integer ops that ONNX Runtime runs with a reference kernel (im2col + integer GEMM, no fusion):
# their rate relative to the fp32 peak. MEASURED: ConvInteger (u8 x s8) takes 1 / 0.19 of the
# time of the fp32 Conv of the same shape (median of 8 ResNet/MobileNet shapes, 1 thread);
# check_cost_model.py would fit it only when a corpus sample runs such a kernel, none does.
REFERENCE_KERNEL_RATE = {"ConvInteger": 0.19}
# Fixed cost per node (kernel dispatch / launch), seconds.
# cpu: FITTED (on the host's kernels; the fallback over every fitted machine).
# gpu: SOURCED: the A100 fit to NVIDIA's published TensorRT latencies gives 5.1 us per kernel,
# in line with a CUDA launch (4-6 us).
# npu: SOURCED: the geometric mean of the NPU fits that determine it (Snapdragon 8 Gen 3
# through QNN 1.9 us, Intel Core Ultra NPU through the OpenVINO EP 25.6 us; the runtime sets
# this cost).
NODE_OVERHEAD_S = {"cpu": 1.163e-06, "gpu": 5e-6, "npu": 6.97e-6}
COST_SOURCES_FILE = "cost_sources.json"
# Where the fitted CPU constants live (package data next to the device profiles).
COST_FIT_FILE = "cost_fit.json"


@dataclass(frozen=True)
class Constants:
    """The efficiency constants one estimate uses (see the module comments) and where they
    came from: ``source`` is ``"defaults"`` (the kind's), ``"sourced"`` (the profile's own
    ``cost_constants`` replace some) or ``"fitted"`` (with ``fit`` the stored record)."""

    compute_efficiency: float
    memory_efficiency: float
    cache_bandwidth_factor: float
    node_overhead_s: float
    reference_kernel_rate: dict[str, float]
    source: str = "defaults"
    fit: dict[str, Any] | None = None

    @classmethod
    def defaults(cls, kind: str) -> Constants:
        return cls(COMPUTE_EFFICIENCY[kind], MEMORY_EFFICIENCY[kind],
                   CACHE_BANDWIDTH_FACTOR[kind], NODE_OVERHEAD_S[kind],
                   dict(REFERENCE_KERNEL_RATE))

    @classmethod
    def from_record(cls, values: dict[str, Any], fit: dict[str, Any] | None = None) -> Constants:
        """The constants a stored fit holds (``constants`` of a cost_fit.json record), the
        reference-kernel rates it lacks at their defaults."""
        return cls(float(values["compute_efficiency"]), float(values["memory_efficiency"]),
                   float(values["cache_bandwidth_factor"]), float(values["node_overhead_s"]),
                   {**REFERENCE_KERNEL_RATE, **values.get("reference_kernel_rate", {})},
                   source="fitted", fit=fit)

    @classmethod
    def for_profile(cls, profile: DeviceProfile) -> Constants:
        """The kind defaults with the profile's own ``cost_constants`` in their place."""
        base = cls.defaults(profile.kind)
        if not profile.cost_constants:
            return base
        own = profile.cost_constants
        return cls(own.get("compute_efficiency", base.compute_efficiency),
                   own.get("memory_efficiency", base.memory_efficiency),
                   own.get("cache_bandwidth_factor", base.cache_bandwidth_factor),
                   own.get("node_overhead_s", base.node_overhead_s),
                   base.reference_kernel_rate, source="sourced")


# Ops that get a kernel of their own. On GPUs and NPUs the graph compiler (TensorRT, QNN,
# CoreML, OpenVINO) fuses the other, elementwise-like ops into a neighbouring kernel's epilogue:
# there they cost neither a launch nor a pass over memory. CPUs run every node.
_KERNEL_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMul", "Gemm",
               "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul",
               "FusedMatMul", "QGemm", "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "Attention",
               "MultiHeadAttention", "Softmax", "LayerNormalization", "SkipLayerNormalization",
               "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "Resize", "Gather",
               "Concat", "Transpose", "ReduceMean", "TopK", "NonMaxSuppression"}
# float32 matrix ops that GPUs with TF32 tensor cores (Ampere and later: profiles listing "tf32")
# run at the TF32 rate: cuBLAS >= 11 and cuDNN >= 8 use TF32 for them by default, and so does
# TensorRT (its TF32 builder flag is on unless cleared). SOURCED (cost_sources.json, "tf32"): the
# Jetson Orin Nano's published TensorRT latencies of float32 ResNet-18 / VGG-13 reach 0.79 / 0.96
# of its CUDA-core fp32 peak, which only tensor cores can.
_TF32_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedMatMul"}
# A low-precision node on a target without a fast path for it reads a float copy of its weights:
# the ratio of item sizes (fp32 4 bytes vs int8 1, int16 2, int4 0.5, fp16/bf16 2): EXACT.
_DEQUANT_GROWTH = {"int8": 4.0, "int16": 2.0, "int4": 8.0, "fp16": 2.0, "bf16": 2.0}
_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size",
             "Constant", "ConstantOfShape", "Dropout"}
_TRANSCENDENTAL = {"Exp", "Log", "Tanh", "Sigmoid", "Erf", "Gelu", "FastGelu", "Softplus",
                   "Sqrt", "Reciprocal", "Pow", "Div", "HardSigmoid", "Elu", "Selu", "Mish",
                   "BiasGelu", "QuickGelu", "Sin", "Cos"}
_NORMS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
          "BatchNormalization", "InstanceNormalization", "GroupNormalization",
          "LpNormalization", "Softmax", "LogSoftmax"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INT_COMPUTE = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                "DynamicQuantizeLSTM", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                "QLinearConcat", "QLinearAveragePool", "QLinearSoftmax"}
_QDQ_FORMATS: dict[tuple[int, int], str] = {
    (TensorProto.UINT8, TensorProto.INT8): "int8_static_qdq_u8s8",
    (TensorProto.INT8, TensorProto.INT8): "int8_static_qdq_s8s8",
    (TensorProto.UINT8, TensorProto.UINT8): "int8_static_qdq_u8u8",
    (TensorProto.UINT16, TensorProto.UINT8): "int16_static_qdq_u16u8",
    (TensorProto.UINT16, TensorProto.INT8): "int16_static_qdq_u16u8",
    (TensorProto.INT16, TensorProto.INT8): "int16_static_qdq_u16u8",
}
# Bytes per element numpy has no dtype for (EXACT: int4 half a byte; a string one pointer).
_ITEMSIZE_OVERRIDE: dict[int, float] = {TensorProto.INT4: 0.5, TensorProto.UINT4: 0.5, TensorProto.STRING: 8.0}


def _itemsize(elem_type: int) -> float:
    if elem_type in _ITEMSIZE_OVERRIDE:
        return _ITEMSIZE_OVERRIDE[elem_type]
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4.0


@dataclass
class NodeCost:
    """Device-independent cost of one node."""

    name: str
    op_type: str
    precision: str  # fp32 | fp16 | bf16 | int8 | int16 | int4 | none
    flops: float
    bytes: float  # all bytes read and written
    qdq_format: str | None = None  # the QDQ format a fused int8 node needs (None otherwise)
    fused: bool = False  # a Q/DQ node folded into its neighbour (no cost of its own)
    weight_bytes: float = 0.0  # the part of ``bytes`` read from initializers
    steps: int = 1  # kernel dispatches on a CPU: a recurrent cell runs one GEMM per time step


@dataclass
class ModelCost:
    """What ``analyse`` finds: per-node costs, weights and the activation high-water mark."""

    nodes: list[NodeCost]
    weight_bytes: float
    peak_activation_bytes: float
    input_shapes: dict[str, list[int]]
    assumptions: list[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(n.flops for n in self.nodes)


@dataclass
class Estimate:
    """Predicted cost of one inference on one target (JSON-able with ``to_dict``)."""

    device: str
    latency_ms: float
    flops: float
    bytes_moved: float
    weight_mb: float
    peak_memory_mb: float
    energy_mj: float
    compute_bound_fraction: float
    by_precision: dict[str, dict[str, float]]
    unsupported: list[str]
    assumptions: list[str]
    calibrated: bool = False
    constants: str = "defaults"  # "sourced" (the profile's own) or "fitted": ``constants_for``
    fit_error_pct: float | None = None  # the fit's median |error| (leave-one-model-out), %

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("latency_ms", "weight_mb", "peak_memory_mb", "energy_mj"):
            out[key] = round(out[key], 4)
        out["compute_bound_fraction"] = round(out["compute_bound_fraction"], 3)
        return out


@dataclass
class HostCalibration:
    """Host efficiency fitted on measured latencies: ``t = scale * roofline + overhead * nodes``."""

    compute_scale: float
    node_overhead_us: float
    points: list[dict]
    median_abs_error_pct: float

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Shapes


def _concrete_inputs(
    model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]] | None
) -> tuple[onnx.ModelProto, dict[str, list[int]], list[str]]:
    """A copy of ``model`` whose graph inputs have fixed dims (see the module docstring)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {i.name for i in fixed.graph.initializer}
    shapes: dict[str, list[int]] = {}
    assumptions: list[str] = []
    for value in fixed.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(value.name)
        concrete: list[int] = []
        for axis, dim in enumerate(dims):
            if given is not None and axis < len(given):
                size = int(given[axis])
            elif dim.HasField("dim_value") and dim.dim_value > 0:
                size = int(dim.dim_value)
            else:
                size = DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM
                label = dim.dim_param or "?"
                assumptions.append(f"{value.name}[{axis}] ({label}) = {size}")
            dim.Clear()
            dim.dim_value = size
            concrete.append(size)
        shapes[value.name] = concrete
    return fixed, shapes, assumptions


def _collect(model: onnx.ModelProto) -> dict[str, tuple[list[int] | None, int]]:
    out: dict[str, tuple[list[int] | None, int]] = {}
    graph = model.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tt = value.type.tensor_type
        shape: list[int] | None = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            shape = dims if all(d >= 0 for d in dims) else None
        prev = out.get(value.name)
        if prev is None or (prev[0] is None and shape is not None):
            out[value.name] = (shape, tt.elem_type)
    for init in graph.initializer:
        out[init.name] = (list(init.dims), init.data_type)
    return out


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fallback_outputs(
    node: onnx.NodeProto, known: dict[str, tuple[list[int] | None, int]]
) -> list[tuple[list[int], int]] | None:
    """Output shapes of an op onnx's shape inference does not know (contrib ops)."""
    first = known.get(node.input[0]) if node.input else None
    if first is None or first[0] is None:
        return None
    shape: list[int] = first[0]
    elem = first[1]
    if node.op_type == "MatMulNBits":
        n = int(_attr(node, "N", 0) or 0)  # type: ignore[call-overload]
        return [([*shape[:-1], n], elem)]
    if node.op_type == "DynamicQuantizeLSTM":
        hidden = int(_attr(node, "hidden_size", 0) or 0)  # type: ignore[call-overload]
        dirs = 2 if _attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
        seq, batch = shape[0], shape[1]
        return [([seq, dirs, batch, hidden], elem), ([dirs, batch, hidden], elem),
                ([dirs, batch, hidden], elem)][: len(node.output)]
    if node.op_type == "DynamicQuantizeMatMul" and len(node.input) > 1:
        w = known.get(node.input[1])
        if w and w[0]:
            return [([*shape[:-1], w[0][-1]], TensorProto.FLOAT)]
    # elementwise-like contrib ops (QLinearAdd, FusedGelu, ...): shape of the first input
    return [(list(shape), elem)] * len(node.output)


def infer_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]] | None = None
) -> tuple[dict[str, tuple[list[int] | None, int]], dict[str, list[int]], list[str]]:
    """Shapes and element types of every tensor, with dynamic dims fixed; also contrib ops."""
    fixed, concrete, assumptions = _concrete_inputs(model, input_shapes)
    for _ in range(64):
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
        except Exception:  # onnx raises several types on odd graphs; fall back to what we have
            inferred = fixed
        known = _collect(inferred)
        added = False
        for node in inferred.graph.node:
            if all(o in known and known[o][0] is not None for o in node.output if o):
                continue
            outs = _fallback_outputs(node, known)
            if outs is None:
                continue
            for name, (shape, elem) in zip(node.output, outs, strict=False):
                if name and (name not in known or known[name][0] is None):
                    inferred.graph.value_info.append(
                        helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, shape)
                    )
                    known[name] = (shape, elem)
                    added = True
        fixed = inferred
        if not added:
            return known, concrete, assumptions
    return known, concrete, assumptions


# ---------------------------------------------------------------------------------------------
# Per-node FLOPs and precision


def _numel(shape: list[int] | None) -> float:
    return float(math.prod(shape)) if shape is not None else 0.0


def _flops(node: onnx.NodeProto, shape_of, numel_out: float) -> float:  # type: ignore[no-untyped-def]
    op = node.op_type

    def s(index: int) -> list[int] | None:
        return shape_of(node.input[index]) if len(node.input) > index and node.input[index] else None

    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = s(3 if op == "QLinearConv" else 1)
        if w is None or len(w) < 2:
            return 2.0 * numel_out
        return 2.0 * numel_out * float(math.prod(w[1:]))
    if op == "ConvTranspose":
        x, w = s(0), s(1)
        if x is None or w is None:
            return 2.0 * numel_out
        return 2.0 * _numel(x) * float(math.prod(w[1:]))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "FusedMatMul"):
        a = s(0)
        k = a[-1] if a else 1
        return 2.0 * numel_out * k
    if op in ("Gemm", "QGemm"):
        a = s(0)
        if not a or len(a) < 2:
            return 2.0 * numel_out
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2.0 * numel_out * k
    if op == "MatMulNBits":
        return 2.0 * numel_out * float(_attr(node, "K", 1) or 1)  # type: ignore[arg-type]
    if op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
        x, w = s(0), s(1)
        hidden = float(_attr(node, "hidden_size", 0) or 0)  # type: ignore[arg-type]
        if not x or len(x) < 3:
            return 0.0
        gates = {"LSTM": 4, "DynamicQuantizeLSTM": 4, "GRU": 3, "RNN": 1}[op]
        direction = _attr(node, "direction", b"forward")
        dirs = 2 if direction in (b"bidirectional", "bidirectional") else 1
        # layout 0: X is [seq, batch, features]; 1: [batch, seq, features]. The feature size
        # comes from W ([dirs, gates*hidden, features]; DynamicQuantizeLSTM: [dirs, features,
        # gates*hidden]) because exporters sometimes leave extra unit axes on X.
        if _attr(node, "layout", 0):
            batch, seq = x[0], x[1]
        else:
            seq, batch = x[0], x[-2]
        features = x[-1]
        if w and len(w) == 3:
            features = w[1] if op == "DynamicQuantizeLSTM" else w[2]
        per_step = 2.0 * gates * hidden * (features + hidden) + 10.0 * gates * hidden
        return dirs * seq * batch * per_step
    if op in ("MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"):
        kernel = _attr(node, "kernel_shape", []) or []
        return numel_out * float(math.prod(kernel))  # type: ignore[call-overload]
    if op.startswith("Global") or op.startswith("QLinearGlobal") or op.startswith("Reduce"):
        return _numel(s(0))
    if op in _TRANSCENDENTAL:
        return 4.0 * numel_out
    if op in _NORMS:
        return 8.0 * numel_out
    if op in _VIEW_OPS or op in _QDQ:
        return numel_out if op in _QDQ else 0.0
    return numel_out


def analyse(
    model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]] | None = None
) -> ModelCost:
    """Per-node FLOPs, bytes and compute precision of ``model`` (device independent)."""
    known, concrete, assumptions = infer_shapes(model, input_shapes)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    def shape_of(name: str) -> list[int] | None:
        entry = known.get(name)
        return entry[0] if entry else None

    def tensor_bytes(name: str) -> float:
        entry = known.get(name)
        if not entry or entry[0] is None:
            return 0.0
        return _numel(entry[0]) * _itemsize(entry[1])

    def elem(name: str) -> int:
        entry = known.get(name)
        return entry[1] if entry else TensorProto.FLOAT

    def dq_source(name: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def fuses_qdq(node: onnx.NodeProto) -> bool:
        # QDQ pattern: every float input comes from a DQ, so the runtime fuses DQ -> op (-> Q)
        # into an integer kernel (QLinearConv, QLinearMatMul, ...)
        if (node.op_type in _QDQ or node.op_type in _VIEW_OPS or node.op_type in _INT_COMPUTE
                or node.op_type == "MatMulNBits"):
            return False
        floats = [i for i in node.input if i and elem(i) in _FLOAT_TYPES]
        return bool(floats) and all(dq_source(i) is not None for i in floats)

    fused_kernels = {id(n) for n in graph.node if fuses_qdq(n)}
    graph_outputs = {o.name for o in graph.output}

    def folded_dq(node: onnx.NodeProto) -> bool:
        # A DQ folds into the kernels it feeds only when every reader is such a kernel; one
        # that also feeds a float op (or is a graph output) runs and writes its float tensor
        # (ONNX Runtime gives the fused kernel a copy of its own), so it costs what it moves.
        users = [c for o in node.output for c in consumers.get(o, [])]
        return (bool(users) and all(id(c) in fused_kernels for c in users)
                and not any(o in graph_outputs for o in node.output))

    def written_bytes(node: onnx.NodeProto, name: str) -> float:
        # A fused int8 kernel whose output only feeds the Q nodes folded into it writes their
        # quantized tensor (its stored element size), not the float one the graph shows.
        users = consumers.get(name, [])
        if (id(node) in fused_kernels and users and name not in graph_outputs
                and all(c.op_type == "QuantizeLinear" for c in users)):
            return sum(tensor_bytes(o) for c in users for o in c.output[:1] if o)
        return tensor_bytes(name)

    costs: list[NodeCost] = []
    fused_nodes: set[int] = set()
    node_ids = {id(n): (n.name or f"{n.op_type}_{i}") for i, n in enumerate(graph.node)}
    for node in graph.node:
        name = node_ids[id(node)]
        op = node.op_type
        out_shape = shape_of(node.output[0]) if node.output else None
        numel_out = _numel(out_shape)
        flops = _flops(node, shape_of, numel_out)
        inputs = [i for i in node.input if i]
        precision = "fp32"
        fmt: str | None = None
        read = 0.0
        weights_read = 0.0
        if op in _INT_COMPUTE:
            precision = "int8"
            if op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM"):
                fmt = "int8_dynamic"
        elif op == "MatMulNBits":
            precision, fmt = "int4", "int4_weight_only"
        elif op not in _QDQ and op not in _VIEW_OPS:
            float_inputs = [i for i in inputs if elem(i) in _FLOAT_TYPES]
            dqs = [dq_source(i) for i in float_inputs]
            if id(node) in fused_kernels:
                act = [d for d in dqs if d is not None and d.input[0] not in initializers]
                wts = [d for d in dqs if d is not None and d.input[0] in initializers]
                act_t = elem(act[0].input[0]) if act else TensorProto.UINT8
                w_t = elem(wts[0].input[0]) if wts else act_t
                fmt = _QDQ_FORMATS.get((act_t, w_t), "int8_static_qdq_u8s8")
                precision = "int16" if act_t in (TensorProto.UINT16, TensorProto.INT16) else "int8"
                fused_nodes.update(id(d) for d in dqs if d is not None and folded_dq(d))
                for outp in node.output:
                    for c in consumers.get(outp, []):
                        if c.op_type == "QuantizeLinear":
                            fused_nodes.add(id(c))
            elif any(elem(i) == TensorProto.FLOAT16 for i in inputs):
                precision = "fp16"
            elif any(elem(i) == TensorProto.BFLOAT16 for i in inputs):
                precision = "bf16"
        if op in _VIEW_OPS:
            precision = "none"
        for inp in inputs:
            dq = dq_source(inp) if precision in ("int8", "int16") else None
            source = dq.input[0] if dq is not None else inp
            read += tensor_bytes(source)
            if source in initializers:
                weights_read += tensor_bytes(source)
        written = sum(written_bytes(node, o) for o in node.output if o)
        steps = 1
        if op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM") and len(inputs) > 2:
            # the recurrent weights R are read again at every time step (from cache), and
            # ONNX Runtime's CPU kernel dispatches the step's GEMMs once per step
            x = shape_of(node.input[0]) or [1]
            steps = int(x[1] if _attr(node, "layout", 0) and len(x) > 1 else x[0])
            read += tensor_bytes(node.input[2]) * max(steps - 1, 0)
        moved = 0.0 if op in _VIEW_OPS else read + written
        costs.append(NodeCost(name, op, precision, flops if precision != "none" else 0.0, moved,
                              fmt, weight_bytes=0.0 if op in _VIEW_OPS else weights_read,
                              steps=max(steps, 1)))
    for node, cost in zip(graph.node, costs, strict=True):
        if id(node) in fused_nodes:
            cost.fused = True

    # Tensors a fused QDQ kernel never materialises: the float outputs of folded DQ nodes and
    # the float output of an integer kernel that only feeds folded Q nodes.
    virtual: set[str] = set()
    for node in graph.node:
        if id(node) in fused_nodes and node.op_type == "DequantizeLinear":
            virtual.update(node.output)
        users = [c for o in node.output for c in consumers.get(o, [])]
        if users and all(id(c) in fused_nodes and c.op_type == "QuantizeLinear" for c in users):
            virtual.update(node.output)
    weight_bytes = float(sum(_numel(list(i.dims)) * _itemsize(i.data_type) for i in initializers.values()))
    peak = _peak_activations(graph, known, initializers, virtual)
    return ModelCost(costs, weight_bytes, peak, concrete, assumptions)


def _peak_activations(graph: onnx.GraphProto, known, initializers, virtual) -> float:  # type: ignore[no-untyped-def]
    """Largest sum of live activation bytes over the topological order (simple liveness)."""
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for inp in node.input:
            last_use[inp] = index
    outputs = {o.name for o in graph.output}

    def size(name: str) -> float:
        entry = known.get(name)
        if not entry or entry[0] is None or name in initializers or name in virtual:
            return 0.0
        return _numel(entry[0]) * _itemsize(entry[1])

    live: dict[str, float] = {i.name: size(i.name) for i in graph.input if i.name not in initializers}
    peak = sum(live.values())
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                live[out] = size(out)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= index and name not in outputs:
                del live[name]
    return peak


# ---------------------------------------------------------------------------------------------
# Estimates


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


@dataclass
class _Term:
    """One node's roofline terms at efficiency 1: compute and memory seconds."""

    node: NodeCost
    compute_s: float  # flops / peak of the precision it runs at
    weight_s: float  # weights streamed from memory
    activation_s: float  # activations, at DRAM bandwidth (the cache factor divides it)
    reference_op: str | None  # op run by a reference kernel (REFERENCE_KERNEL_RATE)
    dispatches: int = 1  # what the per-node overhead is paid for


def _terms(cost: ModelCost, profile: DeviceProfile) -> tuple[list[_Term], list[str]]:
    """The counted nodes' roofline terms on ``profile`` (no efficiency applied) and the
    precisions / formats the profile runs slowly (fallback to fp32)."""
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    terms: list[_Term] = []
    unsupported: set[str] = set()
    for node in cost.nodes:
        if node.fused or (node.flops == 0 and node.bytes == 0):
            continue
        if profile.kind != "cpu" and node.op_type not in _KERNEL_OPS:
            continue  # fused into a neighbouring kernel by the graph compiler
        precision = node.precision
        weight_bytes = node.weight_bytes
        if node.qdq_format is not None and not profile.runs_fast(node.qdq_format):
            unsupported.add(node.qdq_format)
            precision = "fp32"
        elif precision not in ("none", "fp32") and precision not in profile.precisions:
            unsupported.add(precision)
            precision = "fp32"
        if precision == "fp32" and node.precision in _DEQUANT_GROWTH:
            # the fallback kernel works on a dequantized float copy of the weights
            weight_bytes *= _DEQUANT_GROWTH[node.precision]
        reference = node.op_type if node.op_type in REFERENCE_KERNEL_RATE else None
        runs_at = "fp32" if reference or precision == "none" else precision
        if runs_at == "fp32" and node.op_type in _TF32_OPS and "tf32" in profile.precisions:
            runs_at = "tf32"  # cuBLAS / cuDNN / TensorRT use TF32 tensor cores by default
        peak = profile.peak(runs_at) * 1e9
        terms.append(_Term(node, node.flops / peak, weight_bytes / bandwidth,
                           (node.bytes - node.weight_bytes) / bandwidth, reference,
                           node.steps if profile.kind == "cpu" else 1))
    return terms, sorted(unsupported)


def latency_s(cost: ModelCost, profile: DeviceProfile, constants: Constants) -> float:
    """One inference's seconds on ``profile`` with ``constants``: the roofline plus the
    per-node overhead for every dispatch (``estimate`` without a host calibration)."""
    roofline_s, dispatches, *_ = _roofline(cost, profile, constants)
    return roofline_s + constants.node_overhead_s * dispatches


def _roofline(
    cost: ModelCost, profile: DeviceProfile, constants: Constants | None = None,
) -> tuple[float, int, dict[str, dict[str, float]], list[str], float]:
    """Roofline seconds without overhead, dispatches (counted nodes, a CPU recurrent cell once
    per time step), per-precision split, fallbacks."""
    k = constants or constants_for(profile)
    terms, unsupported = _terms(cost, profile)
    total = 0.0
    compute_bound = 0.0
    split: dict[str, dict[str, float]] = {}
    for term in terms:
        rate = k.reference_kernel_rate.get(term.reference_op, 1.0) if term.reference_op else 1.0
        t_compute = term.compute_s / (k.compute_efficiency * rate)
        # Weights stream from memory; activations of inference-sized tensors mostly stay in
        # cache, which is cache_bandwidth_factor times faster.
        t_memory = (term.weight_s + term.activation_s / k.cache_bandwidth_factor) \
            / k.memory_efficiency
        seconds = max(t_compute, t_memory)
        if t_compute >= t_memory:
            compute_bound += seconds
        total += seconds
        node = term.node
        bucket = split.setdefault(node.precision, {"flops": 0.0, "bytes": 0.0, "ms": 0.0, "nodes": 0})
        bucket["flops"] += node.flops
        bucket["bytes"] += node.bytes
        bucket["ms"] += seconds * 1e3
        bucket["nodes"] += 1
    # A Q/DQ node next to an unfused op is real work (its bytes are already in its NodeCost);
    # fused ones were skipped above.
    return total, sum(t.dispatches for t in terms), split, unsupported, compute_bound


# ---------------------------------------------------------------------------------------------
# Fitted CPU constants


@cache
def _cost_fit_data() -> dict[str, Any]:
    """``service/engine/devices/cost_fit.json`` parsed, read once; {} when missing or
    unreadable."""
    import json
    from importlib import resources

    try:
        text = resources.files("service.engine.devices").joinpath(COST_FIT_FILE).read_text(
            encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_cost_fits() -> tuple[dict[str, Any], ...]:
    """The stored CPU fits (``service/engine/devices/cost_fit.json``, ``fit_records``); empty
    when the file is missing or unreadable."""
    return fit_records(_cost_fit_data())


def load_cpu_fallback() -> dict[str, Any] | None:
    """The stored fit of the CPU fallback constants over every fitted machine (``fallback`` in
    cost_fit.json, written by ``scripts/fit_cpu_fallback.py``), with its error on a machine
    left out of the fit; None when there is none."""
    record = _cost_fit_data().get("fallback")
    return record if isinstance(record, dict) and "constants" in record else None


def fit_records(data: Any) -> tuple[dict[str, Any], ...]:
    """The fit records of a parsed cost_fit.json (``{"fits": [...]}``, one record per fitted
    machine's kernels), each with its ``machine`` and ``constants``."""
    records = data.get("fits") if isinstance(data, dict) else None
    return tuple(r for r in records or [] if isinstance(r, dict) and "constants" in r
                 and "machine" in r)


def load_cost_fit(profile: DeviceProfile | None = None) -> dict[str, Any] | None:
    """The stored fit that stands for ``profile`` (a CPU that runs that machine's kernels), or
    None; without a profile, the first stored fit."""
    fits = load_cost_fits()
    if profile is None:
        return fits[0] if fits else None
    return next((f for f in fits if _fit_applies(f, profile)), None)


def assumed_constants(profile: DeviceProfile) -> list[str]:
    """The constants (``name = value``) an estimate for ``profile`` takes from its kind's defaults
    where cost_sources.json labels that default ASSUMPTION; the profile's own values replace
    them. Empty for a kind whose defaults are all sourced."""
    rows = {(r.get("constant"), r.get("key")): r.get("label")
            for r in load_cost_sources().get("constants", [])}
    defaults = Constants.defaults(profile.kind)
    out = []
    for name in ("compute_efficiency", "memory_efficiency", "cache_bandwidth_factor",
                 "node_overhead_s"):
        if name in profile.cost_constants:
            continue
        if rows.get((name.upper(), profile.kind)) == "ASSUMPTION":
            out.append(f"{name} = {getattr(defaults, name):g}")
    return out


@cache
def load_cost_sources() -> dict[str, Any]:
    """Where each constant comes from (``service/engine/devices/cost_sources.json``), read once;
    an empty dict when the file is missing or unreadable."""
    import json
    from importlib import resources

    try:
        text = resources.files("service.engine.devices").joinpath(COST_SOURCES_FILE).read_text(
            encoding="utf-8")
        sources = json.loads(text)
    except (OSError, ValueError):
        return {}
    return sources if isinstance(sources, dict) else {}


def _fit_applies(fit: dict[str, Any], profile: DeviceProfile) -> bool:
    """A fit stands for CPUs that run the fitted machine's kernels (same architecture and
    kernel-selecting ISA features, as ``DeviceProfile.same_kernels_as``)."""
    from service.engine.devices.features import kernel_features

    machine = fit["machine"]
    return (profile.kind == "cpu" and profile.architecture == machine.get("architecture")
            and kernel_features(profile.architecture, profile.isa_features)
            == frozenset(machine.get("kernel_features") or ()))


def constants_for(profile: DeviceProfile, fit: dict[str, Any] | None = None) -> Constants:
    """The constants an estimate on ``profile`` uses: the stored fit for a machine with the
    profile's kernels (``load_cost_fit``, or ``fit``), else the module defaults for the kind
    with the profile's own ``cost_constants`` in their place."""
    fit = fit if fit is not None else load_cost_fit(profile)
    if fit is None or not _fit_applies(fit, profile):
        return Constants.for_profile(profile)
    return Constants.from_record(fit["constants"], fit=fit)


def fit_cpu_constants(
    samples: Sequence[tuple[ModelCost, float, str]], profile: DeviceProfile,
    profiles: Sequence[DeviceProfile] | None = None,
) -> tuple[Constants, list[dict[str, Any]]]:
    """Least-squares fit of the CPU constants on measured latencies of this machine.

    ``samples``: (cost, measured milliseconds, label) measured with ONNX Runtime's CPU EP on
    the machine ``profile`` describes, at its thread count; ``profiles`` (one per sample)
    instead, for one fit over several machines' measurements. Minimises the squared relative
    error (small and large models count alike) over compute efficiency, memory efficiency
    and the reference-kernel rate (log-spaced grid, then a finer one
    around the best point), the per-node overhead solved in closed form (non-negative) at each
    point; the reference-kernel rate keeps its default when no sample runs such a kernel.
    Returns the constants and per-sample {model, predicted_ms, measured_ms, error_pct}.
    """
    machines = list(profiles) if profiles is not None else [profile] * len(samples)
    if len(machines) != len(samples):
        raise ValueError("fit_cpu_constants needs one profile per sample")
    rows = [(_terms(cost, machine)[0], float(ms), label)
            for (cost, ms, label), machine in zip(samples, machines, strict=True) if ms > 0]
    if len(rows) < 2:
        raise ValueError("fit_cpu_constants needs at least two positive measured latencies")
    index = np.concatenate([np.full(len(t), i) for i, (t, _, _) in enumerate(rows)])
    comp = np.array([x.compute_s for t, _, _ in rows for x in t])
    ref = np.array([x.reference_op is not None for t, _, _ in rows for x in t])
    weight = np.array([x.weight_s for t, _, _ in rows for x in t])
    act = np.array([x.activation_s for t, _, _ in rows for x in t])
    nodes = np.array([sum(x.dispatches for x in t) for t, _, _ in rows], dtype=float)
    measured = np.array([ms for _, ms, _ in rows]) * 1e-3

    def solve(ce: float, me: float, cbf: float, rate: float) -> tuple[float, float, np.ndarray]:
        t = np.maximum(comp / (ce * np.where(ref, rate, 1.0)), (weight + act / cbf) / me)
        roof = np.bincount(index, weights=t, minlength=len(rows))
        a, b = nodes / measured, 1.0 - roof / measured
        overhead = max(0.0, float(a @ b / (a @ a)))
        pred = roof + overhead * nodes
        return float(np.sum(((pred - measured) / measured) ** 2)), overhead, pred

    def search(grids: list[np.ndarray]) -> tuple[float, tuple[float, ...]]:
        best: tuple[float, tuple[float, ...]] = (math.inf, ())
        for ce in grids[0]:
            for me in grids[1]:
                for cbf in grids[2]:
                    for rate in grids[3]:
                        loss = solve(ce, me, cbf, rate)[0]
                        if loss < best[0]:
                            best = (loss, (ce, me, cbf, rate))
        return best

    # A rate no sample depends on cannot be fitted: it keeps its default.
    default_rate = REFERENCE_KERNEL_RATE["ConvInteger"]
    rates = np.geomspace(0.02, 1.0, 6) if ref.any() else np.array([default_rate])
    # The cache factor is not fitted: with memory efficiency it only scales the memory term
    # (weights vs activations), and two fits of the corpus on this 2-core host put it at 15.8
    # and 1.4 for the same error: it keeps its default (MEASURED on this host by
    # scripts/measure_cpu_constants.py).
    cache = np.array([CACHE_BANDWIDTH_FACTOR["cpu"]])
    _, point = search([np.geomspace(0.01, 2.0, 24), np.geomspace(0.02, 4.0, 24), cache, rates])
    for width in (1.25, 1.08):  # two finer grids around the best point
        _, point = search([point[0] * np.geomspace(1 / width, width, 7),
                           point[1] * np.geomspace(1 / width, width, 7), cache,
                           point[3] * np.geomspace(1 / width, width, 5) if ref.any()
                           else np.array([default_rate])])
    ce, me, cbf, rate = point
    _, overhead, pred = solve(ce, me, cbf, rate)
    points = [{"model": label, "predicted_ms": round(float(p) * 1e3, 4),
               "measured_ms": round(ms, 4),
               "error_pct": round(100.0 * (float(p) * 1e3 - ms) / ms, 1)}
              for p, (_, ms, label) in zip(pred, rows, strict=True)]
    constants = Constants(round(float(ce), 4), round(float(me), 4), round(float(cbf), 3),
                          float(f"{overhead:.4g}"),
                          {**REFERENCE_KERNEL_RATE, "ConvInteger": round(float(rate), 4)},
                          source="fitted")
    return constants, points


def estimate(
    model: onnx.ModelProto | str | Path,
    profile: DeviceProfile,
    *,
    input_shapes: dict[str, Sequence[int]] | None = None,
    calibration: HostCalibration | None = None,
    cost: ModelCost | None = None,
) -> Estimate:
    """Latency, peak memory and energy of one inference of ``model`` on ``profile``.

    ``calibration`` (from ``calibrate_host``) replaces the default efficiency and overhead; use
    it only with the profile it was fitted for (the host).
    """
    cost = cost or analyse(_load(model), input_shapes)
    constants = constants_for(profile)
    roofline_s, counted, split, unsupported, compute_bound = _roofline(cost, profile, constants)
    if calibration is not None:
        seconds = calibration.compute_scale * roofline_s + calibration.node_overhead_us * 1e-6 * counted
    else:
        seconds = roofline_s + constants.node_overhead_s * counted
    assumptions = list(cost.assumptions)
    fit_error = None
    if constants.fit is not None:
        error = constants.fit.get("error") or {}
        fit_error = error.get("loo_median_abs_pct", error.get("median_abs_pct"))
        machine = constants.fit["machine"]
        assumptions.append(
            f"CPU constants fitted on {machine.get('cpu')} at {machine.get('threads')} "
            f"thread(s) ({constants.fit.get('date')}; peaks scale with the profile's cores): "
            "median |error| "
            f"{error.get('median_abs_pct')} % in-sample, {error.get('loo_median_abs_pct')} % "
            f"leave-one-model-out, over {error.get('samples')} corpus measurements")
    if calibration is None and constants.fit is None and profile.kind == "cpu":
        note, fallback_error = _fallback_note(profile)
        if note:
            assumptions.append(note)
            if constants.source == "defaults":
                fit_error = fallback_error
    if calibration is None and constants.fit is None:
        assumed = assumed_constants(profile)
        if assumed:
            assumptions.append(
                f"{', '.join(assumed)} of {profile.name} rest on no published figure "
                f"(ASSUMPTION in service/engine/devices/{COST_SOURCES_FILE}, which lists what was "
                "searched and checked): no fit error bounds the estimate")
    if constants.source == "sourced" and calibration is None:
        fit = (load_cost_sources().get("fits") or {}).get(profile.name) or {}
        fit_error = fit.get("median_abs_error_pct")
        assumptions.append(
            f"efficiency constants of {profile.name} ({', '.join(sorted(profile.cost_constants))}"
            f") fitted to {fit.get('samples', 'some')} published batch-1 latencies: median "
            f"|error| {fit_error} % (service/engine/devices/{COST_SOURCES_FILE})")
    latency_ms = seconds * 1e3
    for bucket in split.values():
        bucket["ms"] = round(bucket["ms"], 5)
    peak_memory = cost.weight_bytes + cost.peak_activation_bytes
    return Estimate(
        device=profile.name,
        latency_ms=latency_ms,
        flops=cost.flops,
        bytes_moved=sum(n.bytes for n in cost.nodes if not n.fused),
        weight_mb=cost.weight_bytes / 1e6,
        peak_memory_mb=peak_memory / 1e6,
        energy_mj=latency_ms * profile.typical_power_w,  # ms x W = mJ
        compute_bound_fraction=(compute_bound / roofline_s) if roofline_s > 0 else 0.0,
        by_precision=split,
        unsupported=unsupported,
        assumptions=assumptions,
        calibrated=calibration is not None,
        constants=constants.source,
        fit_error_pct=fit_error,
    )


def _fallback_note(profile: DeviceProfile) -> tuple[str | None, float | None]:
    """What an estimate with the CPU fallback constants says of them (the machines they were
    fitted on, their error on a machine left out), and that error; (None, None) without a
    stored fallback fit or where the profile's own ``cost_constants`` replace all three. The
    error is None where no fitted machine has the profile's architecture."""
    fallback = load_cpu_fallback()
    if fallback is None:
        return None, None
    taken = [name for name in ("compute_efficiency", "memory_efficiency", "node_overhead_s")
             if name not in profile.cost_constants]
    if not taken:
        return None, None
    error = fallback.get("error") or {}
    machines = [m.get("label") or m.get("cpu", "?") for m in error.get("per_machine") or []]
    loo = error.get("leave_machine_out_median_abs_pct")
    what = "" if len(taken) == 3 else f" ({', '.join(taken)})"
    note = (f"CPU constants{what}: the fallback, fitted on {len(machines)} machines' corpus "
            f"latencies at 1 thread ({'; '.join(machines)}; scripts/fit_cpu_fallback.py, "
            f"{fallback.get('date')}), none of which runs {profile.name}'s kernels: median "
            f"|error| {loo} % (max {error.get('leave_machine_out_max_abs_pct')} %) on a machine "
            "left out of the fit; peaks scale with the profile's cores")
    architectures = error.get("architectures") or []
    if profile.architecture not in architectures:
        note += (f". None of them is {profile.architecture}: that error does not bound this "
                 f"{profile.architecture} CPU")
        loo = None
    return note, loo


def calibrate_host(
    samples: Iterable[tuple[Any, ...]],
    profile: DeviceProfile | None = None,
    *,
    input_shapes: dict[str, Sequence[int]] | None = None,
) -> HostCalibration:
    """Fit ``measured ≈ scale * roofline + overhead * nodes`` on ONNX Runtime host latencies.

    ``samples``: (model or path or ``ModelCost``, measured milliseconds[, label[, input
    shapes]]) measured on this machine with ONNX Runtime's CPU EP; the input shapes (per sample,
    else ``input_shapes``) must be the ones the latency was measured with. The fit minimises
    relative error (small and large models count alike); with one sample, or a degenerate fit,
    only the scale is fitted. The returned points hold predicted vs measured for every sample
    (the report shows them).
    """
    profile = profile or host_profile()
    rows: list[tuple[float, int, float, str]] = []
    for index, sample in enumerate(samples):
        model, measured = sample[0], float(sample[1])
        label = str(sample[2]) if len(sample) > 2 else f"sample_{index}"
        shapes = sample[3] if len(sample) > 3 else input_shapes
        if not measured > 0:
            continue
        cost = model if isinstance(model, ModelCost) else analyse(_load(model), shapes)
        roofline_s, counted, *_ = _roofline(cost, profile)
        rows.append((roofline_s * 1e3, counted, measured, label))
    if not rows:
        raise ValueError("calibrate_host needs at least one positive measured latency")
    a = np.array([[r[0] / r[2], r[1] / r[2]] for r in rows])  # relative: divide by measured
    b = np.ones(len(rows))
    scale, overhead_ms = 0.0, 0.0
    if len(rows) >= 2:
        solution, *_ = np.linalg.lstsq(a, b, rcond=None)
        scale, overhead_ms = float(solution[0]), float(solution[1])
    # The other model: one factor on the default estimate (geometric mean of measured /
    # predicted). It generalises better across models (leave-one-model-out over the corpus:
    # 24 % vs 39 % median error), so the two-parameter fit is kept only when it fits the
    # samples at least twice as well.
    default_ms = constants_for(profile).node_overhead_s * 1e3
    ratios = [r[2] / max(r[0] + default_ms * r[1], 1e-9) for r in rows]
    factor = float(np.exp(np.mean(np.log(ratios))))

    def median_error(sc: float, ov: float) -> float:
        return float(np.median([abs(sc * r[0] + ov * r[1] - r[2]) / r[2] for r in rows]))

    if (len(rows) < 2 or scale <= 0 or overhead_ms < 0
            or median_error(scale, overhead_ms) * 2 > median_error(factor, default_ms * factor)):
        scale, overhead_ms = factor, default_ms * factor
    points: list[dict[str, Any]] = []
    for roofline_ms, counted, measured, label in rows:
        predicted = scale * roofline_ms + overhead_ms * counted
        points.append({
            "model": label,
            "predicted_ms": round(predicted, 4),
            "measured_ms": round(measured, 4),
            "error_pct": round(100.0 * (predicted - measured) / measured, 1),
        })
    errors = sorted(abs(float(p["error_pct"])) for p in points)
    return HostCalibration(
        compute_scale=round(scale, 4),
        node_overhead_us=round(overhead_ms * 1e3, 3),
        points=points,
        median_abs_error_pct=float(np.median(errors)),
    )
