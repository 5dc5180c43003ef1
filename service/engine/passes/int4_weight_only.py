"""``int4_weight_only``: 4-bit blockwise weights for MatMul layers (``MatMulNBits``).

Each ``MatMul`` whose B is a constant 2-D weight becomes a ``com.microsoft.MatMulNBits`` node
holding packed 4-bit weights, one float scale per ``block_size`` values along K (and a zero
point per block when asymmetric). ``Gemm`` layers are rewritten as MatMul+Add first so they are
reached as well. How the 4-bit values are chosen is ``method``:

- ``rtn`` (default): round to nearest. ONNX Runtime's ``MatMulNBitsQuantizer`` with
  ``DefaultWeightOnlyQuantConfig``; walks If/Loop/Scan bodies too.
- ``hqq``: Half-Quadratic Quantization, data-free: scales and zero points fitted to each block
  by a proximal solver. ONNX Runtime's ``HQQWeightOnlyQuantConfig`` (needs torch). HQQ blocks
  are always asymmetric with float zero points (``symmetric`` does not apply); ONNX Runtime's
  CPU kernel is slow with float zero points, so they are rewritten here as an exact correction
  term the fast kernel can run beside (``_zero_point_corrections``). Rounding HQQ's zero
  points to uint4 instead (and refitting codes and scales) lost its accuracy gain (digits MLP,
  block 32: KLD 5.9e-4 vs RTN 5.1e-4). HQQ fits the weights, not the outputs: on the digits
  MLP at block 128 it lowers the relative weight error below symmetric RTN's (0.0060 vs
  0.0063, first layer) and its own asymmetric starting point's KLD 2.3x (1.74e-3 -> 7.7e-4),
  yet stays above symmetric RTN's KLD (7.0e-4); more iterations, no early stop, or keeping
  the best zero point instead of the last change it by < 1 %. That is the method, not the
  port nor the zero-point rewrite (exact, tested): only the data-aware methods (GPTQ, AWQ)
  target the output error.
- ``gptq``: GPTQ, from the job's dataset, written here: each MatMul's input is captured by
  running the model in ONNX Runtime on the calibration samples, its Hessian ``X^T X`` drives
  row-by-row error compensation, and the int4 codes go straight into a MatMulNBits node.
  ONNX Runtime 1.31 ships a GPTQ (``onnxruntime.quantization.neural_compressor``, a copy of
  Intel Neural Compressor's, no INC package needed) but it is not used: its update reads the
  column below the diagonal of an upper-triangular factor (zeros), so it compensates nothing
  (its ``gptq()`` returns exactly plain RTN on its grid: checked on random correlated inputs),
  and it then rounds that result again on a different grid (symmetric: scale 2·max/15, then
  max/7.5), which on the digits MLP made it 4x worse than RTN (KLD 1.4e-3 vs 3.0e-4, block 32,
  symmetric); it also ignores ``nodes_to_exclude`` and packs zero points wrongly for an odd
  number of blocks. Main graph only: MatMuls inside If/Loop/Scan bodies get RTN.
- ``awq``: activation-aware scale search, from the job's dataset, written here (ONNX Runtime's
  only AWQ is NVIDIA ModelOpt's, a CUDA-oriented extra package). Per MatMul, per input channel
  ``s = mean|x| ** alpha``, ``alpha`` searched on a grid to minimise the MatMul's output error
  on the captured calibration inputs after int4 rounding of ``diag(s) W``; the weight is
  multiplied by ``s`` and a ``Mul`` by ``1/s`` is inserted before the MatMul (kept as its own
  node, not folded into the preceding op); then AWQ's clipping search (``clipped_int4``): per
  block and output column the range shrunk by the ratio of ``CLIP_GRID`` whose int4 rounding
  moves the block's output least on the calibration inputs, rounded by ONNX Runtime's RTN rule
  on the clamped block. ``alpha = 0`` (``s = 1``) and ratio 1.0 are on the grids, so on the
  calibration data no layer gets worse than RTN. Without the clipping search (scales alone),
  on the 39 MB byte-level LM of ``docs/bench/llm_wide.txt`` AWQ block 64 held a higher
  held-out KLD than RTN (0.00151 vs 0.00143).

``embedding`` and ``lm_head`` choose the precision of the embedding tables (``Gather`` of a
constant 2-D table) and of the LM head (the MatMul whose output is a graph output, possibly
through a bias ``Add``): ``int4`` tables are ONNX Runtime's ``GatherBlockQuantized`` (its CPU
kernel runs it; the quantizer's ``quantize_gather``, blocks along the embedding dimension),
``int8`` is int8 + DequantizeLinear (``service.engine.int8``), ``float`` keeps them.

``int8_share`` mixes int4 and int8 by measured layer sensitivity (written here; ONNX Runtime's
quantizer takes one bit width per run): each main-graph MatMul's int4 round-to-nearest is
applied alone and its effect on the model's output measured on the dataset's first
``sensitivity_samples`` (a decoder's next-token KL divergence, else the relative squared
error of the outputs; one session, ``layer_sensitivity``); then the layers with the largest
effect per weight are kept at 8 bits (ONNX Runtime's MatMulNBits ``bits=8``) while they hold at
most ``int8_share`` of the weights. On the tests' byte-level Llama the LM head alone carries
~80 % of RTN int4's KLD although its relative output error is the smallest of all layers:
ranking by per-layer weight or output error (instead of the model's output) picks the wrong
layers (Spearman -0.4 against the measured KLD).

``accuracy_level`` picks the compute type of the CPU kernel: 4 = int8 activations, 1 = float32.
Left unset it is chosen from the job's target (else this host): 4 where the CPU has an int8
dot product MatMulNBits uses (x86 VNNI/AMX/AVX-512, arm64 dotprod/i8mm), ONNX Runtime's default
(float32 compute) elsewhere. Measured on an AMD EPYC with AVX-512 VNNI (6 x 1024x1024 MatMuls,
block 32, batch 1, 1 thread): fp32 0.54 ms, int4 default 0.36 ms, int4 level 4 0.15 ms.

A model whose weights stay in external data (past the engine's inline limit, or 2 GiB) is
quantized one weight at a time (``service.engine.weight_stream.int4_stream``, each weight
mapped from disk, its result written to the pass's own data file): RTN (ONNX Runtime's C++
block quantizer), HQQ (ONNX Runtime's HQQ solver, ``quantize_internal``, called per weight:
its whole-model quantizer takes the model in memory; float zero points written as the same
exact correction), or GPTQ / AWQ (this module's, as above) on activations of the float model
captured a group of layers at a time (``StreamingCapture``: one run of the model over the
calibration feeds per group, at most ``STREAM_CAPTURE_BYTES`` held); main-graph MatMuls,
embedding tables int8 (a scale per row), int4 (``GatherBlockQuantized``, the same bytes as
the in-memory pass, a slice of rows at a time: ``weight_stream.int4_tables``) or float, Gemm
layers float; ``int8_share`` is refused there.

Size: 4 bits per weight + 32/block_size bits of scale (+4/block_size of zero point): ~6.4x
smaller than float32 at block 32, ~7x at block 64 (the default), when MatMul weights dominate.
Convolutions and recurrent layers stay float. The result needs ONNX Runtime (contrib ops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field, field_validator

from service.engine.errors import EngineError
from service.engine.graph import (
    all_nodes,
    ensure_opset,
    float_weight_bytes,
    gemm_to_matmul,
    iter_graphs,
    op_histogram,
)
from service.engine.limits import EngineLimits
from service.engine.normalise import strip_debug_metadata
from service.engine.registry import Pass, PassConfig, PassContext, register
from service.engine.scope import EXCLUDED, ScopeConfig, nodes_to_exclude_field, require, scope_of
from service.engine.weight_stream import Rounding, pack_nbits, zero_point_correction

Method = Literal["rtn", "hqq", "gptq", "awq"]
TablePrecision = Literal["float", "int8", "int4"]
DATA_METHODS = frozenset({"gptq", "awq"})
# AWQ's alpha grid (0 = plain RTN) and the rows of captured input it searches on per MatMul.
AWQ_GRID = tuple(i / 20 for i in range(21))
# AWQ's clipping search: each block's range shrunk by these ratios (1.0 = none), on this many
# rows of the captured input, this many output columns at a time (bounded temporaries).
CLIP_GRID = tuple(1.0 - i / 20 for i in range(11))
CLIP_ROWS = 512
CLIP_COLUMNS = 4096
AWQ_ROWS = 2048
GPTQ_ROWS = 8192  # rows of captured input per MatMul for GPTQ's Hessian


class Int4WeightOnlyConfig(ScopeConfig):
    """Blockwise int4 weight-only quantization of MatMul/Gemm weights."""

    method: Method = Field(
        "rtn",
        description="How 4-bit values are chosen: rtn (round to nearest), hqq (data-free "
        "half-quadratic fit), gptq (error compensation from the dataset), awq (activation-aware "
        "scales from the dataset). gptq and awq need a dataset.",
    )
    block_size: int = Field(
        64,
        ge=16,
        le=256,
        description="Weights per scale along K (power of two, 16..256): smaller = more "
        "accurate, larger = smaller file.",
    )
    symmetric: bool = Field(
        True,
        description="Symmetric blocks (no zero points, smaller); asymmetric adds a 4-bit zero "
        "point per block and is more accurate on skewed weights (hqq is always asymmetric).",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="CPU compute type of MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "activations; null = chosen from the target (4 where the CPU has an int8 dot product).",
    )
    embedding: TablePrecision = Field(
        "float",
        description="Embedding tables (Gather of a constant 2-D table): float, int8, or int4 "
        "(GatherBlockQuantized).",
    )
    lm_head: TablePrecision = Field(
        "int4", description="The MatMul whose output is a graph output: int4, int8 or float."
    )
    calibration_samples: int = Field(
        128, ge=1, le=4096, description="Dataset samples gptq/awq calibrate on."
    )
    min_elements: int = Field(
        4096, ge=1, description="MatMul weights with fewer elements stay float."
    )
    int8_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Mixed int4/int8: up to this share of the quantized MatMul weights "
        "(elements) kept at 8 bits (MatMulNBits bits=8), the layers whose int4 rounding moves "
        "the model's output most per weight first, measured on the dataset (else on generated "
        "inputs). 0 = all int4.",
    )
    sensitivity_samples: int = Field(
        16, ge=1, le=512,
        description="Dataset samples the int8_share sensitivity is measured on.",
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field(
        "Node names kept in float (sensitive layers)."
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128 or 256)")
        return value


def _matmul_weights(model: onnx.ModelProto) -> list[tuple[str, str, int, bool]]:
    """(node name, weight name, elements, in_subgraph) for MatMuls with a 2-D float constant B."""
    out = []
    visible: dict[str, onnx.TensorProto] = {}
    for graph, depth in iter_graphs(model.graph):
        visible.update({t.name: t for t in graph.initializer})
        for node in graph.node:
            if node.op_type != "MatMul" or len(node.input) < 2:
                continue
            t = visible.get(node.input[1])
            if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
                out.append((node.name, t.name, int(np.prod(t.dims)), depth > 0))
    return out


def lm_heads(graph: onnx.GraphProto) -> set[str]:
    """Main-graph MatMuls whose output is a graph output, directly or through one ``Add``."""
    outputs = {o.name for o in graph.output}
    adds = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Add" and n.input}
    return {n.name for n in graph.node if n.op_type == "MatMul"
            and (n.output[0] in outputs or adds.get(n.output[0]) in outputs)}


def choose_accuracy_level(
    config: Int4WeightOnlyConfig, ctx: PassContext
) -> tuple[int | None, str]:
    """(accuracy_level, why): the config's, else 4 where the target CPU computes int8 fast."""
    if config.accuracy_level is not None:
        return config.accuracy_level or None, "set in the recipe"
    from service.engine.devices import host_profile
    from service.engine.devices.features import int8_compute_features

    target = ctx.target if ctx.target is not None and ctx.target.name != "host" else (
        ctx.host or host_profile())
    fast = int8_compute_features(target.architecture, target.isa_features)
    if target.kind == "cpu" and fast:
        return 4, f"{target.name} has {', '.join(sorted(fast))}: int8 compute (level 4)"
    return None, (f"{target.name} lists no int8 dot product for MatMulNBits: ONNX Runtime's "
                  "default compute type")


@contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers log every node at INFO level; keep the worker's log readable."""
    loggers = [logging.getLogger(n) for n in (
        "onnxruntime.quantization.matmul_nbits_quantizer",
        "onnxruntime.quantization.neural_compressor.weight_only")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ort_rtn(model: onnx.ModelProto, config: Int4WeightOnlyConfig,
             exclude: set[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size,
                                        is_symmetric=config.symmetric)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size,
                                     is_symmetric=config.symmetric,
                                     nodes_to_exclude=sorted(exclude), algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def _ort_nbits(model: onnx.ModelProto, config: Int4WeightOnlyConfig, bits: int,
               include: set[str]) -> onnx.ModelProto:
    """ONNX Runtime's round-to-nearest MatMulNBits at ``bits`` for the main-graph MatMuls
    named in ``include`` only (the quantizer's ``nodes_to_include`` adds to its op types
    instead of restricting them, so every other MatMul is excluded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    others = sorted(n.name for n in all_nodes(model)
                    if n.op_type == "MatMul" and n.name not in include)
    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size,
                                        is_symmetric=config.symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size,
                                     is_symmetric=config.symmetric, nodes_to_exclude=others,
                                     algo_config=algo)
    quantizer.process()
    return quantizer.model.model


# ---------------------------------------------------------------------------------------------
# Mixed int4/int8: per-layer sensitivity measured on the model's output

SENSITIVITY_GATE = "edgepress_int4_sensitivity_gate"


def layer_sensitivity(model: onnx.ModelProto, layers: list[tuple[str, str]],
                      feeds: list[dict[str, np.ndarray]], block_size: int,
                      symmetric: bool) -> tuple[dict[str, float], str]:
    """How much int4 round-to-nearest of each MatMul weight alone moves the model's output:
    ({node: value}, metric). A causal decoder's metric is the mean next-token KL divergence
    of its logits (nats), any other model's the summed relative squared error of its float
    outputs.

    One ONNX Runtime session for all layers: the probe model adds, beside each MatMul
    ``x @ W``, a gated correction ``g_i * (x @ (Q(W) - W))`` whose gate vector is a graph
    input; each run switches one layer's gate on (the float model when all are off). Costs
    one float copy of the probed weights and (layers + 1) runs per feed.
    """
    import onnxruntime as ort

    from service.engine.decoder import decoder_spec

    spec = decoder_spec(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    inits = {t.name: t for t in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    graph.input.append(helper.make_tensor_value_info(SENSITIVITY_GATE, TensorProto.FLOAT,
                                                     [len(layers)]))
    after: dict[str, list[onnx.NodeProto]] = {}
    for i, (name, weight) in enumerate(layers):
        node = by_name[name]
        w = numpy_helper.to_array(inits[weight]).astype(np.float32)
        t = f"{SENSITIVITY_GATE}_{i}"
        graph.initializer.extend([
            numpy_helper.from_array((rtn_int4(w, block_size, symmetric) - w).astype(
                np.float32), f"{t}_delta"),
            numpy_helper.from_array(np.array(i, np.int64), f"{t}_index")])
        output = node.output[0]
        node.output[0] = f"{t}_float"
        after[name] = [
            helper.make_node("Gather", [SENSITIVITY_GATE, f"{t}_index"], [f"{t}_g"]),
            helper.make_node("MatMul", [node.input[0], f"{t}_delta"], [f"{t}_d"]),
            helper.make_node("Mul", [f"{t}_d", f"{t}_g"], [f"{t}_e"]),
            helper.make_node("Add", [f"{t}_float", f"{t}_e"], [output]),
        ]
    nodes = [m for n in graph.node for m in (n, *after.get(n.name, []))]
    del graph.node[:]
    graph.node.extend(nodes)
    if spec is not None:
        outputs, metric = [spec.logits], "kl_divergence"
    else:
        outputs = [o.name for o in graph.output
                   if o.type.tensor_type.elem_type == TensorProto.FLOAT]
        metric = "relative_squared_error"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    totals = np.zeros(len(layers))
    for feed in feeds:
        gate = np.zeros(len(layers), np.float32)
        reference = session.run(outputs, {**feed, SENSITIVITY_GATE: gate})
        for i in range(len(layers)):
            gate[:] = 0.0
            gate[i] = 1.0
            got = session.run(outputs, {**feed, SENSITIVITY_GATE: gate})
            totals[i] += _output_change(reference, got, metric)
    return ({name: float(v / max(len(feeds), 1)) for (name, _), v in zip(layers, totals,
                                                                          strict=True)}, metric)


def _output_change(reference: list[np.ndarray], got: list[np.ndarray], metric: str) -> float:
    if metric == "kl_divergence":
        p = _log_softmax(np.asarray(reference[0], np.float64))
        q = _log_softmax(np.asarray(got[0], np.float64))
        return float((np.exp(p) * (p - q)).sum(-1).mean())
    return float(sum(np.sum((np.asarray(b, np.float64) - a) ** 2)
                     / max(float(np.sum(np.asarray(a, np.float64) ** 2)), 1e-30)
                     for a, b in zip(reference, got, strict=True)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def choose_int8_layers(model: onnx.ModelProto, targets: list[tuple[str, str, int, bool]],
                       config: Int4WeightOnlyConfig, ctx: PassContext,
                       level: int | None) -> dict:
    """The MatMuls kept at 8 bits for ``config.int8_share``: each main-graph target's
    sensitivity (``layer_sensitivity`` on the dataset's first ``sensitivity_samples``, else on
    generated inputs), then greedily by sensitivity per weight (the output change removed per
    extra bit) while the 8-bit layers hold at most ``int8_share`` of the targets' weights.

    Where MatMulNBits would not compute in int8 (``accuracy_level`` other than 4) its 8-bit
    kernel is far slower than float (ONNX Runtime 1.31, AMD EPYC, 6 x 1024x1024, batch 1:
    fp32 1.2 ms, 8 bits at level 4 0.15 ms, 8 bits at the default level 21 ms), so the chosen
    layers stay float instead."""
    main = [(t[0], t[1], t[2]) for t in targets if not t[3]]
    budget = int(config.int8_share * sum(t[2] for t in targets))
    feeds = _sensitivity_feeds(model, config, ctx)
    sens, metric = layer_sensitivity(model, [(n, w) for n, w, _ in main], feeds,
                                     config.block_size, config.symmetric)
    chosen: list[str] = []
    used = 0
    for name, _w, numel in sorted(main, key=lambda t: -sens[t[0]] / max(t[2], 1)):
        if sens[name] > 0 and used + numel <= budget:
            chosen.append(name)
            used += numel
    as_float = level != 4
    return {
        "int8_share": config.int8_share,
        "int8_nodes": [] if as_float else chosen,
        "float_nodes": chosen if as_float else [],
        "share_kept": round(used / max(sum(t[2] for t in targets), 1), 4),
        "metric": metric,
        "measured_on": f"{len(feeds)} feed(s) of "
                       + ("the dataset" if ctx.dataset is not None else "generated inputs"),
        "sensitivity": dict(sorted(sens.items(), key=lambda kv: -kv[1])[:64]),
        "why_float": ("MatMulNBits' 8-bit kernel is slow without int8 compute (accuracy "
                      "level 4): the most sensitive layers stay float") if as_float else None,
    }


def _sensitivity_feeds(model: onnx.ModelProto, config: Int4WeightOnlyConfig,
                       ctx: PassContext) -> list[dict[str, np.ndarray]]:
    if ctx.dataset is not None:
        feeds = _calibration(model, config.model_copy(
            update={"calibration_samples": config.sensitivity_samples}), ctx)
        ctx.notes.pop("calibration", None)  # that note is the method's (gptq, awq)
        return feeds
    if ctx.inputs is not None:
        return ctx.inputs.feeds(max(1, min(config.sensitivity_samples, 4)), seed=0)
    raise EngineError(
        "invalid_dataset",
        "int8_share measures each layer's sensitivity on sample inputs: upload a dataset with "
        "the job (or give its input shapes)",
    )


# ---------------------------------------------------------------------------------------------
# The methods: (model, config, targets, exclude, ctx) -> model with MatMulNBits


def _rtn(model: onnx.ModelProto, config: Int4WeightOnlyConfig, targets: list[str],
         exclude: set[str], ctx: PassContext) -> onnx.ModelProto:
    return _ort_rtn(model, config, exclude)


def _hqq(model: onnx.ModelProto, config: Int4WeightOnlyConfig, targets: list[str],
         exclude: set[str], ctx: PassContext) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size,
                                     nodes_to_exclude=sorted(exclude), algo_config=algo)
    quantizer.process()
    out = quantizer.model.model
    ctx.notes["hqq_zero_point_corrections"] = _zero_point_corrections(out.graph)
    return out


def _zero_point_corrections(graph: onnx.GraphProto) -> int:
    """Main-graph MatMulNBits with float zero points (HQQ's) rewritten exactly for the fast
    kernel: ``(q - z) s = (q - 8) s + (8 - z) s``, i.e. MatMulNBits without zero points (the
    implicit 8) plus ``blocksum(x) @ C`` with ``C[b, n] = (8 - z[b, n]) s[b, n]`` (Reshape,
    ReduceSum, MatMul, Reshape to the output's shape, Add). C has as many floats as the zero
    points it replaces. Needs K a multiple of the block size; other nodes keep float zero
    points. Returns how many were rewritten.

    Why: ONNX Runtime 1.31's CPU MatMulNBits has no fast kernel for float zero points. Measured
    on an AMD EPYC (AVX-512 VNNI), 2 x 1024x1024 MatMuls, batch 1, 1 thread: float32 0.28 ms,
    RTN int4 0.08 ms, HQQ as ONNX Runtime writes it 2.35 ms.
    """
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        nodes.append(node)
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(
            node.input) > 3 else None
        if zp is None or zp.data_type != TensorProto.FLOAT or node.input[2] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        if k % block:
            continue
        blocks = k // block
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zero = numpy_helper.to_array(zp).reshape(n, blocks)
        base = node.name or node.output[0]
        correction = numpy_helper.from_array(((8.0 - zero) * scale).T.astype(np.float32),
                                             f"{base}_zp_correction")
        output = node.output[0]
        node.output[0] = f"{output}_nbits"
        del node.input[3:]
        extra, consts = zero_point_correction(base, node.input[0], node.output[0], output,
                                              blocks, block, correction.name)
        graph.initializer.extend([correction, *consts])
        nodes += extra
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return done


def _calibrated_targets(model: onnx.ModelProto, config: Int4WeightOnlyConfig,
                        targets: list[str], ctx: PassContext, max_rows: int) -> tuple[
        dict[str, TensorProto], list[tuple[int, onnx.NodeProto]], dict[str, np.ndarray]]:
    """For GPTQ / AWQ in memory: the initializers by name, the target MatMuls with their
    positions in the graph, and their inputs captured on the calibration feeds."""
    feeds = _calibration(model, config, ctx)
    chosen = set(targets)
    nodes = [(i, n) for i, n in enumerate(model.graph.node) if n.name in chosen]
    captured = capture_inputs(model, sorted({n.input[0] for _, n in nodes}), feeds, max_rows)
    return {t.name: t for t in model.graph.initializer}, nodes, captured


def _splice(model: onnx.ModelProto, replaced: dict[int, list[onnx.NodeProto]],
            config: Int4WeightOnlyConfig, exclude: set[str]) -> onnx.ModelProto:
    """``model`` with the nodes at each position of ``replaced`` swapped for their
    MatMulNBits (and what goes before it); MatMuls left in If/Loop/Scan bodies get RTN."""
    chosen = {model.graph.node[i].name for i in replaced}
    kept = [m for i, n in enumerate(model.graph.node) for m in replaced.get(i, [n])]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_initializers(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return _ort_rtn(model, config, exclude | chosen)


def _gptq(model: onnx.ModelProto, config: Int4WeightOnlyConfig, targets: list[str],
          exclude: set[str], ctx: PassContext) -> onnx.ModelProto:
    inits, nodes, captured = _calibrated_targets(model, config, targets, ctx, GPTQ_ROWS)
    note_calibration_rows(ctx, min(len(x) for x in captured.values()),
                          [int(x.shape[1]) for x in captured.values()])
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for index, (position, node) in enumerate(nodes):
        ctx.check_cancelled()
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        codes, scales, zeros = gptq_int4(captured[node.input[0]], w, config.block_size,
                                         config.symmetric)
        new, tensors = matmul_nbits(node, codes, scales, zeros, config.block_size, index)
        model.graph.initializer.extend(tensors)
        replaced[position] = [new]
        ctx.progress(0.2 + 0.5 * (index + 1) / len(nodes), f"gptq for {node.name}")
    return _splice(model, replaced, config, exclude)


def _awq(model: onnx.ModelProto, config: Int4WeightOnlyConfig, targets: list[str],
         exclude: set[str], ctx: PassContext) -> onnx.ModelProto:
    inits, nodes, captured = _calibrated_targets(model, config, targets, ctx, AWQ_ROWS)
    alphas: dict[str, float] = {}
    clips: dict[str, float] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for index, (position, node) in enumerate(nodes):
        ctx.check_cancelled()
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        codes, scales, zeros, scale, alphas[node.name], clips[node.name] = awq_int4(
            captured[node.input[0]], w, config.block_size, config.symmetric)
        before: list[onnx.NodeProto] = []
        if scale is not None:
            inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32),
                                              f"{node.input[1]}_awq_inv_scale_{index}")
            model.graph.initializer.append(inverse)
            scaled_input = f"{node.input[0]}_awq_{index}"
            before.append(helper.make_node("Mul", [node.input[0], inverse.name],
                                           [scaled_input], name=f"{node.name}_awq_scale_{index}"))
        new, tensors = matmul_nbits(node, codes, scales, zeros, config.block_size, index)
        if before:
            new.input[0] = before[0].output[0]
        model.graph.initializer.extend(tensors)
        replaced[position] = [*before, new]
        ctx.progress(0.2 + 0.5 * (index + 1) / len(nodes), f"awq for {node.name}")
    ctx.notes["awq_alpha"] = alphas
    ctx.notes["awq_clip_ratio"] = clips
    return _splice(model, replaced, config, exclude)


METHODS: dict[str, Callable[..., onnx.ModelProto]] = {
    "rtn": _rtn, "hqq": _hqq, "gptq": _gptq, "awq": _awq,
}


# ---------------------------------------------------------------------------------------------
# Calibration data and AWQ's search


def _calibration(model: onnx.ModelProto, config: Int4WeightOnlyConfig,
                 ctx: PassContext) -> list[dict[str, np.ndarray]]:
    """The dataset's first ``calibration_samples`` as model feeds (8 rows per feed where the
    batch is dynamic); ``invalid_dataset`` without one: these methods need real inputs."""
    from service.engine.dataset import split_feeds

    if ctx.dataset is None:
        raise EngineError(
            "invalid_dataset",
            f"int4 method {config.method!r} calibrates on real inputs: upload a dataset (.npz "
            "keyed by input name) with the job, or use method 'rtn' or 'hqq' (no data needed)",
        )
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    missing = [n for n in names if n not in ctx.dataset]
    if missing:
        raise EngineError("invalid_dataset",
                          f"the dataset has no array for model input(s) {', '.join(missing)}")
    data = {n: np.asarray(ctx.dataset[n])[: config.calibration_samples] for n in names}
    feeds, _ = split_feeds(model, data, None, config.calibration_samples, group=8)
    ctx.notes["calibration"] = {"source": "dataset", "samples": len(next(iter(data.values()))),
                                "method": config.method}
    return feeds


def capture_inputs(model: onnx.ModelProto, names: list[str],
                   feeds: list[dict[str, np.ndarray]], max_rows: int) -> dict[str, np.ndarray]:
    """The values of tensors ``names`` over ``feeds`` (ONNX Runtime), each as rows of its last
    axis ([rows, K]), at most ``max_rows`` rows (an even subsample)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return captured_rows(session, names, feeds, max_rows)


def captured_rows(session: Any, names: list[str], feeds: list[dict[str, np.ndarray]],
                  max_rows: int, check_cancelled: Callable[[], None] = lambda: None,
                  ) -> dict[str, np.ndarray]:
    """``session``'s outputs ``names`` over ``feeds``, each as rows of its last axis, at most
    ``max_rows`` of them (``even_rows``)."""
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    if hasattr(session, "run_many"):  # a model run segment by segment: every feed at once
        check_cancelled()
        for result in session.run_many(feeds, names):
            for name in names:
                value = result[name]
                rows[name].append(np.asarray(value, np.float32).reshape(-1, value.shape[-1]))
        return {name: even_rows(np.concatenate(parts), max_rows) for name, parts in rows.items()}
    for feed in feeds:
        check_cancelled()
        for name, value in zip(names, session.run(names, feed), strict=True):
            rows[name].append(np.asarray(value, np.float32).reshape(-1, value.shape[-1]))
    return {name: even_rows(np.concatenate(parts), max_rows) for name, parts in rows.items()}


def rtn_int4(w: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """``w`` [K, N] after int4 round-to-nearest in blocks along K, dequantized (the rounding
    ONNX Runtime's DefaultWeightOnlyQuantizer applies)."""
    k = w.shape[0]
    pad = -k % block_size
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block_size, w.shape[1])
    if symmetric:
        hi, lo = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
        scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.round(blocks / safe), -8, 7) * scale
    else:
        lo = np.minimum(blocks.min(axis=1, keepdims=True), 0)
        hi = np.maximum(blocks.max(axis=1, keepdims=True), 0)
        scale = (hi - lo) / 15.0
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / safe), 0, 15)
        q = (np.clip(np.round(blocks / safe + zero), 0, 15) - zero) * scale
    return q.reshape(-1, w.shape[1])[:k]


def awq_search(x: np.ndarray, w: np.ndarray, block_size: int,
               symmetric: bool) -> tuple[float, np.ndarray]:
    """(alpha, s): per-input-channel scales ``s = mean|x| ** alpha`` (normalised to a geometric
    mean of 1) minimising ``|| x w - (x / s) Q(diag(s) w) ||^2`` over ``AWQ_GRID``."""
    magnitude = np.abs(x).mean(axis=0)
    magnitude = np.maximum(magnitude, magnitude.max() * 1e-3 + 1e-12)  # dead channels
    reference = x @ w
    best: tuple[float, float, np.ndarray] = (np.inf, 0.0, np.ones(len(magnitude), np.float32))
    for alpha in AWQ_GRID:
        s = magnitude ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        error = float(np.mean(((x / s) @ rtn_int4(w * s[:, None], block_size, symmetric)
                               - reference) ** 2))
        if error < best[0]:
            best = (error, alpha, s)
    return best[1], best[2]


def awq_int4(x: np.ndarray, w: np.ndarray, block_size: int, symmetric: bool) -> tuple[
        np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, float, float]:
    """AWQ of ``w`` [K, N] for inputs ``x`` [rows, K]: the scale search (``awq_search``), then
    the clipping search on the scaled weights (``clipped_int4``). Returns codes, scales, zero
    points (``clipped_int4``'s), the per-input-channel scales ``s`` (None where alpha is 0:
    no ``Mul`` needed), alpha and the mean clip ratio."""
    alpha, scale = awq_search(x, w, block_size, symmetric)
    if alpha != 0.0:
        w, x = w * scale[:, None], x / scale
    codes, scales, zeros, clip = clipped_int4(x, w, block_size, symmetric)
    return codes, scales, zeros, None if alpha == 0.0 else scale, alpha, clip


def even_rows(x: np.ndarray, max_rows: int) -> np.ndarray:
    """At most ``max_rows`` rows of ``x``, an even subsample (all of them when fewer)."""
    return x[np.linspace(0, len(x) - 1, max_rows).astype(int)] if len(x) > max_rows else x


def clipped_int4(x: np.ndarray, w: np.ndarray, block_size: int,
                 symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """AWQ's weight clipping (Lin et al. 2024, ``auto_clip``): per block of ``block_size``
    input rows and per output column, the weights clamped to ``ratio * max |w|`` for each
    ratio of ``CLIP_GRID`` and rounded to int4 (ONNX Runtime's RTN rule on the clamped
    block), keeping the ratio whose rounding error moves the block's output ``x_b (w_b -
    Q(w_b))`` least on ``CLIP_ROWS`` rows of ``x``. Ratio 1.0 (plain RTN) is on the grid.
    Returns codes [K, N] (0..15), scales and zero points [blocks, N] (None: symmetric) and the
    mean ratio chosen."""
    k, n = w.shape
    rows = np.asarray(even_rows(x, CLIP_ROWS), np.float32)
    blocks = -(-k // block_size)
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((blocks, n), np.float32)
    zeros = np.zeros((blocks, n), np.float32)
    chosen = np.ones((blocks, n), np.float32)
    for b in range(blocks):
        lo_k, hi_k = b * block_size, min(k, (b + 1) * block_size)
        xb = rows[:, lo_k:hi_k]
        for c0 in range(0, n, CLIP_COLUMNS):
            c1 = min(n, c0 + CLIP_COLUMNS)
            wb = np.asarray(w[lo_k:hi_k, c0:c1], np.float32)
            peak = np.abs(wb).max(axis=0)
            best = np.full(c1 - c0, np.inf)
            for ratio in CLIP_GRID:
                bound = peak * ratio
                clamped = np.clip(wb, -bound, bound)
                scale, zero = _int4_params(clamped, symmetric)
                q = np.clip(np.round(clamped / scale) + zero, 0, 15)
                err = ((xb @ (wb - (q - zero) * scale)) ** 2).sum(axis=0)
                take = err < best
                best = np.where(take, err, best)
                codes[lo_k:hi_k, c0:c1][:, take] = q[:, take].astype(np.uint8)
                scales[b, c0:c1][take] = scale[take]
                zeros[b, c0:c1][take] = zero[take]
                chosen[b, c0:c1][take] = ratio
    return codes, scales, None if symmetric else zeros, float(chosen.mean())


def _int4_params(block: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (scale, zero point) of int4 codes 0..15 for ``block`` [rows, N]: ONNX
    Runtime's RTN rule (symmetric: the largest-magnitude value maps to code 0, zero point 8)."""
    hi, lo = block.max(axis=0), block.min(axis=0)
    if symmetric:
        scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
        zero = np.full_like(scale, 8.0)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / 15.0
        zero = np.clip(np.round(-lo / np.where(scale == 0, 1.0, scale)), 0, 15)
    return np.where(scale == 0, 1.0, scale), zero


def note_calibration_rows(ctx: PassContext, rows: int, widths: list[int]) -> None:
    """GPTQ's Hessian of a layer with K inputs has rank at most the rows it saw: with fewer
    rows than K its damping, not the data, decides the directions the data never spans, and
    the rounding can come out worse than round-to-nearest. Noted, and a warning past that."""
    widest = max(widths, default=0)
    ctx.notes["calibration_rows"] = {"rows": int(rows), "widest_input": int(widest)}
    if rows < widest:
        ctx.notes.setdefault("warnings", []).append(
            f"GPTQ calibrated on {rows} rows (tokens or samples) for layers with up to {widest} "
            "inputs: fewer rows than inputs leave its Hessian rank-deficient, and it can round "
            "worse than RTN; give at least as many calibration tokens as the widest layer "
            "has inputs")


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of ``h``'s inverse (inv(h) = U^T U), as GPTQ's reference
    takes it (torch: Cholesky of ``h``, ``cholesky_inverse``, Cholesky again). Measured for a
    5632 x 5632 float32 ``h`` on this project's 2-core EPYC: 256 MB of memory at its peak
    and 2.3 s, against 968 MB and 6.8 s for numpy's ``inv`` alone (LAPACK's workspace)."""
    import torch

    with torch.no_grad():
        lower = torch.linalg.cholesky(torch.from_numpy(h))
        inverse = torch.cholesky_inverse(lower)
        del lower
        return torch.linalg.cholesky(inverse, upper=True).numpy()


def gptq_int4(x: np.ndarray, w: np.ndarray, block_size: int, symmetric: bool,
              percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ (Frantar et al. 2022) of ``w`` [K, N] for inputs ``x`` [rows, K]: rows of W are
    rounded in order, each rounding error spread over the rows not yet rounded through the
    inverse Hessian's Cholesky factor (``H = x^T x``, damped by ``percdamp`` of its mean
    diagonal); block scales are fitted to the already compensated weights. In float32, as the
    reference implementation computes it: the K x K Hessian, its inverse and their factor, and
    a copy of the weights, are what a layer costs (K = 5632: 127 MB each). Returns int4
    codes [K, N] (0..15), scales and zero points [K/block_size, N] (zero points None when
    symmetric: MatMulNBits' implicit 8)."""
    k, n = w.shape
    x32 = np.asarray(x, np.float32)
    h = x32.T @ x32 / max(len(x), 1)
    weights = w.astype(np.float32)  # a copy
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[dead] = 0.0
    h[np.diag_indices(k)] += percdamp * np.mean(np.diag(h))
    hinv = _inverse_cholesky(h)  # upper: inv(h) = hinv^T hinv
    del h
    blocks = -(-k // block_size)
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((blocks, n), np.float32)
    zeros = np.zeros((blocks, n), np.float32)
    lazy = max(128, block_size)  # a multiple of block_size: groups start inside a lazy batch
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = weights[i1:i2].copy()
        err = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                scale, zero = _int4_params(w1[i:i + block_size], symmetric)
                scales[row // block_size], zeros[row // block_size] = scale, zero
            q = np.clip(np.round(w1[i] / scale) + zero, 0, 15)
            codes[row] = q
            err[i] = (w1[i] - (q - zero) * scale) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], err[i])
        for r in range(i2, k, lazy):  # in slices: no (K - i2) x N temporary
            weights[r:r + lazy] -= hinv[i1:i2, r:r + lazy].T @ err
    return codes, scales.astype(np.float32), None if symmetric else zeros.astype(np.uint8)


def matmul_nbits(node: onnx.NodeProto, codes: np.ndarray, scales: np.ndarray,
                 zeros: np.ndarray | None, block_size: int,
                 index: int) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """A MatMulNBits node (and its tensors) for int4 ``codes`` [K, N], ``scales``/``zeros``
    [K/block_size, N] (``pack_nbits``' layout)."""
    k, n = codes.shape
    packed, scale_t, zp = pack_nbits(codes, scales, zeros, block_size)
    base = f"{node.input[1]}_gptq_{index}"
    tensors = [numpy_helper.from_array(packed, base + "_q4"),
               numpy_helper.from_array(scale_t, base + "_scales")]
    if zp is not None:
        tensors.append(numpy_helper.from_array(zp, base + "_zp"))
    new = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)],
                           list(node.output), name=node.name + "_Q4", domain="com.microsoft",
                           K=k, N=n, bits=4, block_size=block_size)
    return new, tensors


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---------------------------------------------------------------------------------------------
# Embedding tables, the LM head, accuracy level


def _tables_int4(model: onnx.ModelProto, block_size: int, symmetric: bool) -> list[str]:
    """Main-graph Gathers of a constant 2-D float table read by nothing else, as ONNX Runtime's
    GatherBlockQuantized (int4, blocks along the embedding dimension)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),)))
    graph = model.graph
    tables = {n.name for n in _embedding_gathers(graph)}
    done: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in tables:
            nodes.extend(quantizer.quantize(node, [graph]))
            done.append(node.name)
        else:
            nodes.append(node)
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph)
        model.ir_version = max(model.ir_version, 10)  # INT4/UINT4 tensors
    return done


def _embedding_gathers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.FLOAT
            and len(inits[n.input[0]].dims) == 2 and readers[n.input[0]] == 1]


def _tables_int8(model: onnx.ModelProto, op_type: str, nodes: set[str]) -> list[str]:
    from service.engine.int8 import weight_only_int8

    others = {n.name for n in all_nodes(model) if n.name not in nodes}
    done, _ = weight_only_int8(model, {op_type}, min_elements=1, exclude=set(),
                               main_graph=True, subgraphs=False, skip_nodes=others)
    return [d["node"] for d in done]


def _embeddings(model: onnx.ModelProto, config: Int4WeightOnlyConfig) -> list[str]:
    """The embedding tables in ``config.embedding``'s precision; returns the Gathers changed."""
    if config.embedding == "int4":
        return _tables_int4(model, config.block_size, config.symmetric)
    if config.embedding == "int8":
        return _tables_int8(model, "Gather", {n.name for n in _embedding_gathers(model.graph)})
    return []


def _set_accuracy_level(model: onnx.ModelProto, level: int | None) -> None:
    if level is None:
        return
    for node in all_nodes(model):
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


@register
class Int4WeightOnly(Pass[Int4WeightOnlyConfig]):
    """4-bit blockwise weight-only quantization (MatMulNBits): RTN, HQQ, GPTQ or AWQ."""

    name = "int4_weight_only"
    config_model = Int4WeightOnlyConfig
    quantizes = True
    calibrates = False
    trains = False
    scoped = True
    streams = True
    description = (
        "4-bit blockwise weights for MatMul/Gemm layers (ONNX Runtime MatMulNBits; RTN, HQQ, "
        "or GPTQ/AWQ from a dataset), optional int8/int4 embeddings and LM head: ~6x smaller "
        "transformers and MLPs; other ops stay float. Needs ONNX Runtime."
    )

    @classmethod
    def calibrates_with(cls, config: PassConfig) -> bool:
        return isinstance(config, Int4WeightOnlyConfig) and (
            config.method in DATA_METHODS or config.int8_share > 0)

    @classmethod
    def cannot_stream(cls, config: PassConfig) -> str | None:
        if not isinstance(config, Int4WeightOnlyConfig):
            return super().cannot_stream(config)
        return streaming_refusal(config)

    def run(
        self, model: onnx.ModelProto, config: Int4WeightOnlyConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.external import has_external

        if has_external(model):
            return _run_streaming(model, config, ctx)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        work = ensure_opset(work, 13)
        bytes_before = model.ByteSize()
        scope = scope_of(config)
        gemms = {
            n.name for n in work.graph.node if n.op_type == "Gemm" and not scope.excludes(n.name)
        }
        rewritten = gemm_to_matmul(work, gemms) if gemms else []
        heads = lm_heads(work.graph)

        candidates = _matmul_weights(work)
        skipped = []
        exclude = set(scope.nodes_to_exclude)
        for node, _weight, numel, _sub in candidates:
            if scope.excludes(node):
                skipped.append({"node": node, "reason": EXCLUDED})
            elif node in heads and config.lm_head != "int4":
                skipped.append({"node": node, "reason": f"LM head kept {config.lm_head}"})
                exclude.add(node)
            elif numel < config.min_elements:
                skipped.append({"node": node, "reason": f"{numel} elements < min_elements"})
                exclude.add(node)
        targets = require(
            [c for c in candidates if c[0] not in exclude],
            skipped,
            lambda _: (
                "no MatMul/Gemm with a constant 2-D float weight of at least "
                f"{config.min_elements} elements: int4 weight-only has nothing to compress "
                f"(the model's ops: {', '.join(sorted(op_histogram(model))[:15])})"
            ),
        )
        level, level_reason = choose_accuracy_level(config, ctx)
        mixed: dict | None = None
        if config.int8_share > 0:
            ctx.progress(0.1, "int4 sensitivity of each MatMul")
            mixed = choose_int8_layers(work, targets, config, ctx, level)
            wide = set(mixed["int8_nodes"]) | set(mixed["float_nodes"])
            targets = [t for t in targets if t[0] not in wide]
            exclude |= wide
        ctx.progress(0.2, f"int4 {config.method} quantization of {len(targets)} MatMul weights")
        try:
            with _quiet():
                out = METHODS[config.method](work, config, [t[0] for t in targets], exclude, ctx)
                if mixed is not None and mixed["int8_nodes"]:
                    out = _ort_nbits(out, config, 8, set(mixed["int8_nodes"]))
                tables = _embeddings(out, config)
        except EngineError:
            raise
        except Exception as exc:  # library failure -> pass failure, with its reason
            raise EngineError(
                "pass_failed",
                f"int4 {config.method} quantization failed: "
                + str(exc).strip().splitlines()[0][:300],
            ) from None
        head_int8 = (_tables_int8(out, "MatMul", heads & {c[0] for c in candidates})
                     if config.lm_head == "int8" else [])
        _set_accuracy_level(out, level)
        nbits = [n.name for n in all_nodes(out) if n.op_type == "MatMulNBits"]
        debug_bytes = strip_debug_metadata(out)
        bytes_after = out.ByteSize()
        left = float_weight_bytes(out)
        ctx.notes.update(
            {
                "method": config.method,
                "quantized": len(nbits),
                "quantized_nodes": nbits[:200],
                "gemm_as_matmul": rewritten,
                "skipped": skipped,
                "block_size": config.block_size,
                "symmetric": config.symmetric if config.method != "hqq" else False,
                "accuracy_level": level,
                "accuracy_level_reason": level_reason,
                "embedding": {"precision": config.embedding, "nodes": tables},
                "mixed_int8": mixed,
                "lm_head": {"precision": config.lm_head, "nodes": sorted(heads),
                            "int8_nodes": head_int8},
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
                "float_weight_bytes_left": left,
                "debug_metadata_bytes_removed": debug_bytes,
                "note": "weights of Conv, LSTM/GRU and small MatMuls stay float",
            }
        )
        if not nbits or bytes_after >= bytes_before:
            raise EngineError(
                "no_effect",
                f"int4 quantization changed nothing ({len(nbits)} MatMulNBits, {bytes_before} -> "
                f"{bytes_after} bytes)",
            )
        return out


def streaming_refusal(config: Int4WeightOnlyConfig) -> str | None:
    """Why ``config`` cannot run on a model kept in external data (RTN, HQQ, GPTQ or AWQ one
    weight at a time, embedding tables float, int8 or int4, no int8 share), or None."""
    if config.int8_share > 0:
        return ("int8_share measures each layer's sensitivity with the whole model in memory; "
                "on a model kept in external data set it to 0")
    return None


STREAM_CAPTURE_BYTES = 256 << 20  # captured activations held at once on the streaming path


class StreamingCapture:
    """Activations for GPTQ / AWQ on a model kept in external data, a few layers at a time.

    ``rows(name)`` returns the captured rows ([rows, K], at most ``max_rows``, an even
    subsample) of tensor ``name``, which must be asked for in graph order: on a name not yet
    captured it drops what it holds and runs the float model over the calibration feeds once,
    capturing that name and the next ones while their rows fit ``STREAM_CAPTURE_BYTES``. Each
    run is an ONNX Runtime session of the model as it is on disk (a probe written beside hard
    links to its data files, so nothing is copied; ``evaluate.make_session``: one shared
    read-only mapping, no prepacking), or, where its weights pass what the job may hold at once
    (``segments.segment_budget`` under ``limits``), the probe run segment by segment
    (``evaluate.original_session``), so the process holds the graph, one group of activations,
    one segment's weights and the weight being rounded. Activations come from the float model
    for every layer (as the in-memory path captures them), not from already quantized
    layers."""

    limits = EngineLimits()  # decides whether a capture run goes segment by segment

    def __init__(self, model: onnx.ModelProto, names: list[str], feeds: list[dict[str, Any]],
                 max_rows: int, workdir: Path, check_cancelled: Callable[[], None]) -> None:
        self.model, self.names, self.feeds = model, names, feeds
        self.max_rows, self.workdir = max_rows, workdir
        self.check_cancelled = check_cancelled
        self.held: dict[str, np.ndarray] = {}
        self.rows_seen: dict[str, int] = {}  # rows captured per tensor name
        self.runs = 0
        self.segmented = False  # some capture run went segment by segment
        self._probe: onnx.ModelProto | None = None
        widths = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 2}
        readers = {n.input[0]: widths.get(n.input[1], 1) for n in model.graph.node
                   if n.op_type == "MatMul" and len(n.input) > 1}
        self.width = {name: readers.get(name, 1) for name in names}

    def rows(self, name: str) -> np.ndarray:
        if name not in self.held:
            start = self.names.index(name)
            group: list[str] = []
            budget = 0
            for other in self.names[start:]:
                cost = self.max_rows * self.width[other] * 4
                if group and budget + cost > STREAM_CAPTURE_BYTES:
                    break
                group.append(other)
                budget += cost
            self.held = {}  # the last group's rows go before the next run
            self.held = self._capture(group)
        return self.held[name]

    def _capture(self, names: list[str]) -> dict[str, np.ndarray]:
        from service.engine.evaluate import original_session

        self.check_cancelled()
        probe = onnx.ModelProto()
        probe.CopyFrom(self._probe_model())
        outputs = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names
                                  if n not in outputs)
        run_path = self.workdir / f"probe_{self.runs}.onnx"  # beside the hard links
        onnx.save_model(probe, str(run_path))
        try:
            session = original_session(run_path, 1, self.limits)
            self.segmented = self.segmented or hasattr(session, "segments")
            out = captured_rows(session, names, self.feeds, self.max_rows,
                                self.check_cancelled)
            del session
        finally:
            run_path.unlink(missing_ok=True)
        self.runs += 1
        self.rows_seen.update({n: len(x) for n, x in out.items()})
        return out

    def _probe_model(self) -> onnx.ModelProto:
        """The model's graph with its external tensors read from hard links in ``workdir``
        (copies where the filesystem cannot link) to their files, made once."""
        import os
        import shutil

        from service.engine.external import external_source, initializers, is_external

        if self._probe is not None:
            return self._probe
        self.workdir.mkdir(parents=True, exist_ok=True)
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        linked: dict[Path, str] = {}
        for t in initializers(probe):
            if not is_external(t):
                continue
            source, offset, length = external_source(t)
            source = source.resolve()
            if source not in linked:
                target = self.workdir / f"probe_{len(linked)}.data"
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
                linked[source] = target.name
            del t.external_data[:]
            for key, value in (("location", linked[source]), ("offset", str(offset)),
                               ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        self._probe = probe
        return probe


class _GptqRounding(Rounding):
    name = "gptq"

    def __init__(self, capture: StreamingCapture, block_size: int, symmetric: bool) -> None:
        self.capture, self.block_size, self.symmetric = capture, block_size, symmetric

    def quantize(self, node: onnx.NodeProto, w: np.ndarray) -> Any:
        codes, scales, zeros = gptq_int4(self.capture.rows(node.input[0]), w, self.block_size,
                                         self.symmetric)
        return codes, scales, zeros, None


class _HqqRounding(Rounding):
    """HQQ on one weight at a time: ONNX Runtime's HQQ solver (``HQQWeightOnlyQuantizer.
    quantize_internal``, what its whole-model quantizer runs per weight), its float zero
    points kept exact beside the fast kernel by ``int4_stream``."""

    name = "hqq"

    def __init__(self, block_size: int) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            HQQWeightOnlyQuantConfig,
            HQQWeightOnlyQuantizer,
        )

        self.block_size = block_size
        self.solver = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size,
                                                                      bits=4))

    def quantize(self, node: onnx.NodeProto, w: np.ndarray) -> Any:
        import torch

        k = w.shape[0]
        codes, scales, zeros = self.solver.quantize_internal(
            torch.from_numpy(np.array(w, np.float32)).T, bits=4, group_size=self.block_size)
        # [N, K padded] codes, [N, blocks] scales and zero points -> [K, N] and [blocks, N]
        return (codes.numpy().T[:k].astype(np.uint8), scales.numpy().T.astype(np.float32),
                zeros.numpy().T.astype(np.float32), None)


class _AwqRounding(Rounding):
    name = "awq"

    def __init__(self, capture: StreamingCapture, block_size: int, symmetric: bool) -> None:
        self.capture, self.block_size, self.symmetric = capture, block_size, symmetric
        self.alphas: dict[str, float] = {}
        self.clips: dict[str, float] = {}

    def quantize(self, node: onnx.NodeProto, w: np.ndarray) -> Any:
        codes, scales, zeros, scale, self.alphas[node.name], self.clips[node.name] = awq_int4(
            self.capture.rows(node.input[0]), w, self.block_size, self.symmetric)
        return codes, scales, zeros, scale


def _run_streaming(
    model: onnx.ModelProto, config: Int4WeightOnlyConfig, ctx: PassContext
) -> onnx.ModelProto:
    """The pass on a model kept in external data: one weight at a time, RTN or (with the
    job's dataset) GPTQ / AWQ on activations captured a few layers at a time; embedding
    tables int8 (a scale per row), int4 (GatherBlockQuantized) or float."""
    from service.engine.weight_stream import int4_stream, int4_tables, int8_weight_only

    reason = streaming_refusal(config)
    if reason is not None:
        raise EngineError("invalid_recipe", reason, {"method": config.method})
    work = ensure_opset(model, 13)
    scope = scope_of(config)
    exclude = {n.name for n in work.graph.node if scope.excludes(n.name)}
    level, level_reason = choose_accuracy_level(config, ctx)
    heads = lm_heads(work.graph)
    rounding: Rounding | None = None
    capture = None
    if config.method in ("gptq", "awq"):
        feeds = _calibration(work, config, ctx)
        inits = {t.name for t in work.graph.initializer}
        order = list(dict.fromkeys(
            n.input[0] for n in work.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits))
        capture = StreamingCapture(work, order, feeds,
                                   GPTQ_ROWS if config.method == "gptq" else AWQ_ROWS,
                                   ctx.workdir / "capture", ctx.check_cancelled)
        rounding = (_GptqRounding if config.method == "gptq" else _AwqRounding)(
            capture, config.block_size, config.symmetric)
    elif config.method == "hqq":
        rounding = _HqqRounding(config.block_size)
    result = int4_stream(work, ctx.workdir, block_size=config.block_size,
                         symmetric=config.symmetric, accuracy_level=level,
                         min_elements=config.min_elements, exclude=exclude,
                         heads=heads, lm_head=config.lm_head, rounding=rounding,
                         check_cancelled=ctx.check_cancelled, progress=ctx.progress)
    if capture is not None:
        import shutil

        shutil.rmtree(ctx.workdir / "capture", ignore_errors=True)  # the hard links
        ctx.notes["streaming_capture"] = {
            "runs": capture.runs, "rows_per_input": capture.max_rows,
            "group_bytes": STREAM_CAPTURE_BYTES, "segmented": capture.segmented,
            "note": "activations of the float model, captured a group of layers at a time "
                    "(one pass of the float model over the calibration feeds per group)"}
        if config.method == "gptq" and capture.rows_seen:
            note_calibration_rows(ctx, min(capture.rows_seen.values()),
                                  [capture.width[n] for n in capture.rows_seen])
    embedding_nodes: list[str] = []
    out = result.model
    if config.embedding != "float":
        tables = (int8_weight_only(out, ctx.workdir, op_types={"Gather"},
                                   min_elements=config.min_elements, exclude=exclude,
                                   check_cancelled=ctx.check_cancelled)
                  if config.embedding == "int8" else
                  int4_tables(out, ctx.workdir, block_size=config.block_size,
                              symmetric=config.symmetric, min_elements=config.min_elements,
                              exclude=exclude, check_cancelled=ctx.check_cancelled))
        embedding_nodes = tables.quantized
        out = tables.model
        result.bytes_after = tables.bytes_after
    ctx.notes.update({**result.notes(), "method": config.method,
                      "block_size": config.block_size,
                      "symmetric": config.symmetric, "accuracy_level": level,
                      "accuracy_level_reason": level_reason,
                      "lm_head": {"precision": config.lm_head},
                      "embedding": {"precision": config.embedding if embedding_nodes
                                    else "float", "nodes": embedding_nodes}})
    if isinstance(rounding, _HqqRounding):
        ctx.notes["symmetric"] = False  # HQQ fits a zero point per block
        ctx.notes["hqq_zero_point_corrections"] = result.zero_point_corrections
    if isinstance(rounding, _AwqRounding):
        ctx.notes["awq_alpha"] = rounding.alphas
        ctx.notes["awq_clip_ratio"] = rounding.clips
    if not result.quantized or result.bytes_after >= result.bytes_before:
        raise EngineError(
            "no_effect",
            f"int4 quantization changed nothing ({len(result.quantized)} MatMulNBits, "
            f"{result.bytes_before} -> {result.bytes_after} bytes)",
            {"skipped": result.skipped[:50]})
    return out
