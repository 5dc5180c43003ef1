"""Fake quantization on the bridge and export of the learned quantization as QDQ ONNX.

Weights of Conv/Gemm/MatMul: int8, symmetric, per output channel (scale = max|w| / 127,
recomputed every step; straight-through rounding). Activations read or written by those layers:
uint8 with a learned scale (LSQ: the scale is a parameter, trained on a log scale through the
rounding and clipping, initialised from observed ranges) and a zero point fixed at observation.

``export_qdq`` writes the float graph with ``QuantizeLinear``/``DequantizeLinear`` pairs on every
quantized activation (learned scales), int8 weights with per-channel ``DequantizeLinear``
(the original weight name is kept for the consumer) and int32 biases, which ONNX Runtime fuses
into integer kernels. The export reproduces the fake quantization of training exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from service.engine.errors import EngineError
from service.engine.training.bridge import OnnxModule
from service.engine.training.graph import attr, consumers, initializers

QUANT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class QuantPlan:
    """Which weights (with their output-channel axis) and activations get quantized."""

    weights: dict[str, int] = field(default_factory=dict)  # weight name -> channel axis
    biases: dict[str, tuple[str, str]] = field(default_factory=dict)  # bias -> (act, weight)
    activations: list[str] = field(default_factory=list)


def plan_quantization(model: onnx.ModelProto, op_types: list[str]) -> QuantPlan:
    """Quantize every selected layer with an initializer weight, its input and output."""
    inits = initializers(model)
    outputs = {o.name for o in model.graph.output}
    uses = consumers(model)
    plan = QuantPlan()
    acts: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if w.data_type != onnx.TensorProto.FLOAT or len(w.dims) < 2:
            continue
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            if attr(node, "transA", 0):
                continue
            axis = 0 if attr(node, "transB", 0) else 1
        else:
            if len(w.dims) != 2:
                continue
            axis = 1
        plan.weights[node.input[1]] = axis
        acts.append(node.input[0])
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] in inits:
            bias = inits[node.input[2]]
            if len(bias.dims) == 1 and bias.dims[0] == w.dims[axis]:
                plan.biases[node.input[2]] = (node.input[0], node.input[1])
        out = node.output[0]
        readers = uses.get(out, [])
        # Like ONNX Runtime's Conv+Relu fusion: quantize after the activation, not before
        # (a signed pre-activation range would waste half of the uint8 grid).
        if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and out not in outputs:
            out = readers[0].output[0]
        if out not in outputs:
            acts.append(out)
    plan.activations = list(dict.fromkeys(acts))
    return plan


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_weight(w: torch.Tensor, axis: int, qmax: int = 127) -> torch.Tensor:
    """Symmetric int8 per-channel fake quantization with straight-through rounding.

    ``qmax`` is the largest integer weight: 127 (full range) or 64 (7-bit weights for CPUs
    whose int8 kernels saturate, see ``service.engine.int8_encoding``).
    """
    dims = [d for d in range(w.dim()) if d != axis]
    scale = (w.detach().abs().amax(dim=dims, keepdim=True) / float(qmax)).clamp_min(1e-12)
    return torch.clamp(_round_ste(w / scale), -qmax, qmax) * scale


def weight_scales(w: np.ndarray, axis: int, qmax: int = 127) -> np.ndarray:
    """The per-channel scales ``fake_quant_weight`` uses, as float32 [channels]."""
    dims = tuple(d for d in range(w.ndim) if d != axis)
    return np.maximum(np.abs(w).max(axis=dims) / float(qmax), 1e-12).astype(np.float32)


class ActivationQuantizer(nn.Module):
    """uint8 fake quantization with a learned scale (log-parameterised) and fixed zero point."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(scale))))
        self.zero_point = float(np.clip(np.round(-lo / scale), 0, 255))

    @property
    def scale(self) -> float:
        return float(torch.exp(self.log_scale.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.exp(self.log_scale)
        q = torch.clamp(_round_ste(x / s) + self.zero_point, 0, 255)
        return (q - self.zero_point) * s


class FakeQuantizedModule:
    """Attach fake quantization to an :class:`OnnxModule` per a :class:`QuantPlan`."""

    def __init__(self, module: OnnxModule, plan: QuantPlan, calibration: dict[str, np.ndarray],
                 weight_max: int = 127):
        self.module = module
        self.plan = plan
        self.weight_max = weight_max
        with torch.no_grad():
            seen = module(
                {k: torch.from_numpy(v) for k, v in calibration.items()},
                capture=plan.activations,
            )
        self.quantizers = {
            name: ActivationQuantizer(float(seen[name].min()), float(seen[name].max()))
            for name in plan.activations
        }
        weight_names = set(plan.weights)

        def weight_hook(node: onnx.NodeProto, index: int, value: torch.Tensor) -> torch.Tensor:
            name = node.input[index]
            if index == 1 and name in weight_names:
                return fake_quant_weight(value, plan.weights[name], weight_max)
            return value

        def activation_hook(name: str, value: torch.Tensor) -> torch.Tensor:
            quantizer = self.quantizers.get(name)
            return quantizer(value) if quantizer is not None else value

        module.weight_hook = weight_hook
        module.activation_hook = activation_hook

    def parameters(self) -> list[nn.Parameter]:
        return [q.log_scale for q in self.quantizers.values()]


def export_qdq(float_model: onnx.ModelProto, fq: FakeQuantizedModule) -> onnx.ModelProto:
    """The trained model as QDQ ONNX with the learned scales (see module docstring)."""
    opset = next((o.version for o in float_model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 13:
        raise EngineError(
            "unsupported_model",
            f"per-channel QDQ export needs opset 13 or newer, the model has opset {opset}",
        )
    model = fq.module.write_back(float_model)
    plan = fq.plan
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for name, axis in plan.weights.items():
        w = arrays[name]
        scale = weight_scales(w, axis, fq.weight_max)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -fq.weight_max, fq.weight_max)
        q = q.astype(np.int8)
        new_inits += [
            numpy_helper.from_array(q, f"{name}__q"),
            numpy_helper.from_array(scale, f"{name}__scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}__zp"),
        ]
        head.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}__q", f"{name}__scale", f"{name}__zp"],
                [name],
                axis=axis,
                name=f"{name}__dq",
            )
        )
        replaced.add(name)
    for bias, (act, weight) in plan.biases.items():
        b = arrays[bias]
        scale = (weight_scales(arrays[weight], plan.weights[weight], fq.weight_max)
                 * fq.quantizers[act].scale)
        scale = scale.astype(np.float32)
        q = np.round(b / scale).astype(np.int64)
        if np.abs(q).max(initial=0) >= 2**31:
            continue  # an int32 bias would overflow: keep this bias float
        new_inits += [
            numpy_helper.from_array(q.astype(np.int32), f"{bias}__q"),
            numpy_helper.from_array(scale, f"{bias}__scale"),
            numpy_helper.from_array(np.zeros_like(q, dtype=np.int32), f"{bias}__zp"),
        ]
        head.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{bias}__q", f"{bias}__scale", f"{bias}__zp"],
                [bias],
                axis=0,
                name=f"{bias}__dq",
            )
        )
        replaced.add(bias)
    keep = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    graph_inputs = [i for i in model.graph.input if i.name not in replaced]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)

    # Activations: X -> Q -> DQ -> X__dq, every reader of X now reads X__dq.
    act_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name in plan.activations:
        quantizer = fq.quantizers[name]
        new_inits += []
        scale_t = numpy_helper.from_array(np.array(quantizer.scale, np.float32), f"{name}__s")
        zp_t = numpy_helper.from_array(np.array(quantizer.zero_point, np.uint8), f"{name}__zp")
        model.graph.initializer.extend([scale_t, zp_t])
        act_nodes[name] = [
            helper.make_node(
                "QuantizeLinear",
                [name, scale_t.name, zp_t.name],
                [f"{name}__q"],
                name=f"{name}__quant",
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{name}__q", scale_t.name, zp_t.name],
                [f"{name}__dq"],
                name=f"{name}__dequant",
            ),
        ]
    old = list(model.graph.node)
    del model.graph.node[:]
    nodes: list[onnx.NodeProto] = list(head)
    graph_inputs_q = [n for n in plan.activations if n in {i.name for i in model.graph.input}]
    for name in graph_inputs_q:
        nodes += act_nodes[name]
    for node in old:
        for i, name in enumerate(node.input):
            if name in act_nodes:
                node.input[i] = f"{name}__dq"
        nodes.append(node)
        for name in node.output:
            if name in act_nodes:
                nodes += act_nodes[name]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return model
