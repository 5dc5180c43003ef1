"""Execute an ONNX graph as a ``torch.nn.Module`` so that its weights can be trained.

``OnnxModule(model)`` walks the graph node by node with torch operations: float initializers
become ``nn.Parameter`` (trainable) or buffers (frozen: BatchNorm statistics, scalars), and
``write_back(model)`` copies the learned values into the ONNX initializers of a copy of the
model. The graph itself is never re-exported, so the output is the same valid ONNX graph with
new weights (no torch.onnx round trip, no op-set drift).

Only the ops in ``SUPPORTED_OPS`` are executed; anything else raises
``EngineError("unsupported_op_for_training")`` naming the op and the node, before any training
starts. Import this module inside a pass's ``run`` (it imports torch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from service.engine.errors import EngineError
from service.engine.training.graph import attr

_ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

# Inputs that are statistics or hyper-parameters, never trained: (op, input index).
_FROZEN_INPUTS = {("BatchNormalization", 3), ("BatchNormalization", 4)}

OpFn = Callable[[onnx.NodeProto, list[Any], "OnnxModule"], list[Any]]
_OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for n in names:
            _OPS[n] = fn
        return fn

    return deco


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _opt(inputs: list[Any], i: int) -> Any:
    return inputs[i] if i < len(inputs) else None


# --------------------------------------------------------------------------- elementwise


def _binary(fn: Callable[[Any, Any], Any]) -> OpFn:
    return lambda node, x, m: [fn(x[0], x[1])]


_op("Add")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))
_op("Pow")(_binary(torch.pow))
_op("Equal")(_binary(torch.eq))
_op("Less")(_binary(torch.lt))
_op("Greater")(_binary(torch.gt))
_op("MatMul")(_binary(torch.matmul))


@_op("Div")
def _div(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    if x[0].is_floating_point():
        return [x[0] / x[1]]
    return [torch.div(x[0], x[1], rounding_mode="trunc")]  # ONNX integer division truncates


@_op("Mod")
def _mod(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    if attr(node, "fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


def _unary(fn: Callable[[Any], Any]) -> OpFn:
    return lambda node, x, m: [fn(x[0])]


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
    "Identity": lambda t: t,
}.items():
    _op(_name)(_unary(_fn))


@_op("LeakyRelu")
def _leaky(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [F.leaky_relu(x[0], float(attr(node, "alpha", 0.01)))]


@_op("Elu")
def _elu(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [F.elu(x[0], float(attr(node, "alpha", 1.0)))]


@_op("HardSigmoid")
def _hsig(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    a = float(attr(node, "alpha", 0.2))
    b = float(attr(node, "beta", 0.5))
    return [torch.clamp(a * x[0] + b, 0.0, 1.0)]


@_op("HardSwish")
def _hswish(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [F.hardswish(x[0])]


@_op("Gelu")
def _gelu(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [F.gelu(x[0], approximate=str(attr(node, "approximate", "none")))]


@_op("Clip")
def _clip(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    lo = _opt(x, 1)
    hi = _opt(x, 2)
    if lo is None and attr(node, "min") is not None:
        lo = float(attr(node, "min"))
    if hi is None and attr(node, "max") is not None:
        hi = float(attr(node, "max"))
    out = x[0]
    if lo is not None:
        out = torch.clamp(out, min=lo)
    if hi is not None:
        out = torch.clamp(out, max=hi)
    return [out]


@_op("Where")
def _where(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [torch.where(x[0], x[1], x[2])]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    out = x[0]
    for t in x[1:]:
        if node.op_type == "Max":
            out = torch.maximum(out, t)
        elif node.op_type == "Min":
            out = torch.minimum(out, t)
        else:
            out = out + t
    if node.op_type == "Mean":
        out = out / len(x)
    return [out]


@_op("Cast")
def _cast(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    to = int(attr(node, "to"))
    if to not in _ONNX_TO_TORCH:
        raise EngineError(
            "unsupported_op_for_training",
            f"Cast to {onnx.TensorProto.DataType.Name(to)} in node {node.name!r} cannot be trained",
            {"op": "Cast", "node": node.name},
        )
    return [x[0].to(_ONNX_TO_TORCH[to])]


@_op("BitShift")
def _bitshift(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    a, b = x[0].to(torch.int64), x[1].to(torch.int64)
    out = a >> b if attr(node, "direction") in ("RIGHT", b"RIGHT") else a << b
    return [out.to(x[0].dtype)]


@_op("BitwiseAnd")
def _bitand(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [torch.bitwise_and(x[0], x[1])]


# --------------------------------------------------------------------------- layers


def _spatial_pads(node: onnx.NodeProto, rank: int) -> tuple[list[int], list[int]]:
    pads = list(attr(node, "pads", [0] * (2 * rank)))
    return pads[:rank], pads[rank:]


def _same_pads(
    node: onnx.NodeProto, x: torch.Tensor, kernel: list[int], strides: list[int], dil: list[int]
) -> tuple[list[int], list[int]]:
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dil, strict=True):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        upper = attr(node, "auto_pad") in ("SAME_UPPER", b"SAME_UPPER")
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins, ends


def _pad_input(
    node: onnx.NodeProto,
    x: torch.Tensor,
    kernel: list[int],
    strides: list[int],
    dil: list[int],
    value: float = 0.0,
) -> tuple[torch.Tensor, list[int]]:
    """Apply ONNX padding; returns the input and the symmetric padding left for torch."""
    rank = x.dim() - 2
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER", b"SAME_UPPER", b"SAME_LOWER"):
        begins, ends = _same_pads(node, x, kernel, strides, dil)
    elif auto in ("VALID", b"VALID"):
        begins, ends = [0] * rank, [0] * rank
    else:
        begins, ends = _spatial_pads(node, rank)
    if begins == ends:
        return x, begins
    torch_pad: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        torch_pad += [b, e]
    return F.pad(x, torch_pad, value=value), [0] * rank


@_op("Conv")
def _conv(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    inp, w, b = x[0], x[1], _opt(x, 2)
    rank = inp.dim() - 2
    strides = list(attr(node, "strides", [1] * rank))
    dil = list(attr(node, "dilations", [1] * rank))
    kernel = list(w.shape[2:])
    inp, pad = _pad_input(node, inp, kernel, strides, dil)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    group = int(attr(node, "group", 1))
    return [conv(inp, w, b, strides, pad, dil, group)]


@_op("ConvTranspose")
def _conv_t(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    inp, w, b = x[0], x[1], _opt(x, 2)
    rank = inp.dim() - 2
    strides = list(attr(node, "strides", [1] * rank))
    dil = list(attr(node, "dilations", [1] * rank))
    begins, ends = _spatial_pads(node, rank)
    if begins != ends or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise EngineError(
            "unsupported_op_for_training",
            f"ConvTranspose node {node.name!r} uses asymmetric or automatic padding",
            {"op": "ConvTranspose", "node": node.name},
        )
    out_pad = list(attr(node, "output_padding", [0] * rank))
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    group = int(attr(node, "group", 1))
    return [fn(inp, w, b, strides, begins, out_pad, group, dil)]


@_op("Gemm")
def _gemm(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    a, b, c = x[0], x[1], _opt(x, 2)
    if attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if attr(node, "transB", 0):
        b = b.transpose(0, 1)
    out = float(attr(node, "alpha", 1.0)) * (a @ b)
    if c is not None:
        out = out + float(attr(node, "beta", 1.0)) * c
    return [out]


@_op("BatchNormalization")
def _bn(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    # Fine-tuning keeps the running statistics frozen (they are the deployed model's).
    eps = float(attr(node, "epsilon", 1e-5))
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=eps)]


@_op("LayerNormalization")
def _ln(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axis = int(attr(node, "axis", -1))
    axis = axis % x[0].dim()
    shape = list(x[0].shape[axis:])
    eps = float(attr(node, "epsilon", 1e-5))
    return [F.layer_norm(x[0], shape, x[1], _opt(x, 2), eps)]


def _softmax_like(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
        if m.opset >= 13:
            return [fn(x[0], dim=int(attr(node, "axis", -1)))]
        # Before opset 13 the input is coerced to 2-D at ``axis`` (default 1).
        axis = int(attr(node, "axis", 1)) % x[0].dim()
        flat = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
        return [fn(flat, dim=1).reshape(x[0].shape)]

    return run


_op("Softmax")(_softmax_like(torch.softmax))
_op("LogSoftmax")(_softmax_like(torch.log_softmax))


def _pool(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    inp = x[0]
    rank = inp.dim() - 2
    kernel = list(attr(node, "kernel_shape"))
    strides = list(attr(node, "strides", [1] * rank))
    dil = list(attr(node, "dilations", [1] * rank))
    ceil = bool(attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        inp, pad = _pad_input(node, inp, kernel, strides, dil, value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        return [fn(inp, kernel, strides, pad, dil, ceil_mode=ceil)]
    count_pad = bool(attr(node, "count_include_pad", 0))
    rank_pads = _spatial_pads(node, rank)
    if rank_pads[0] != rank_pads[1] or any(d != 1 for d in dil):
        raise EngineError(
            "unsupported_op_for_training",
            f"AveragePool node {node.name!r} uses asymmetric padding or dilation",
            {"op": "AveragePool", "node": node.name},
        )
    avg: Any = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return [avg(inp, kernel, strides, rank_pads[0], ceil, count_pad)]


_op("MaxPool", "AveragePool")(_pool)


@_op("GlobalAveragePool")
def _gap(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _gmp(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@_op("Dropout")
def _dropout(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    # The deployed graph runs Dropout in inference mode; training keeps it off too so the
    # student learns the function that will run.
    out = [x[0]]
    if len(node.output) > 1:
        out.append(torch.ones_like(x[0], dtype=torch.bool))
    return out


# --------------------------------------------------------------------------- shapes


@_op("Flatten")
def _flatten(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axis = int(attr(node, "axis", 1)) % max(x[0].dim(), 1)
    lead = int(np.prod(x[0].shape[:axis])) if axis else 1
    return [x[0].reshape(lead, -1)]


@_op("Reshape")
def _reshape(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    shape = _ints(x[1])
    if not attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@_op("Transpose")
def _transpose(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


@_op("Concat")
def _concat(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    parts = [t for t in x if t is not None]
    return [torch.cat(parts, dim=int(attr(node, "axis")))]


def _axes(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[int] | None:
    from_attr = attr(node, "axes")
    if from_attr is not None:
        return list(from_attr)
    if len(x) > 1 and x[1] is not None:
        return _ints(x[1])
    return None


@_op("Squeeze")
def _squeeze(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axes = _axes(node, x, m)
    if axes is None:
        return [x[0].squeeze()]
    axes = sorted(a % x[0].dim() for a in axes)
    out = x[0]
    for a in reversed(axes):
        out = out.squeeze(a)
    return [out]


@_op("Unsqueeze")
def _unsqueeze(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axes = _axes(node, x, m) or []
    rank = x[0].dim() + len(axes)
    out = x[0]
    for a in sorted(a % rank for a in axes):
        out = out.unsqueeze(a)
    return [out]


@_op("Shape")
def _shape(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    dims = list(x[0].shape)
    start = int(attr(node, "start", 0))
    end = attr(node, "end")
    dims = dims[start:] if end is None else dims[start : int(end)]
    return [torch.tensor(dims, dtype=torch.int64)]


@_op("Size")
def _size(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@_op("Gather")
def _gather(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    data, idx = x[0], x[1].to(torch.int64)
    axis = int(attr(node, "axis", 0)) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    shape = list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1 :])
    return [out.reshape(shape)]


@_op("Slice")
def _slice(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    data = x[0]
    if len(x) > 1:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(_opt(x, 3)) or list(range(len(starts)))
        steps = _ints(_opt(x, 4)) or [1] * len(starts)
    else:  # opset < 10: attributes
        starts = list(attr(node, "starts"))
        ends = list(attr(node, "ends"))
        axes = list(attr(node, "axes", range(len(starts))))
        steps = [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= data.dim()
        size = data.shape[a]
        if st > 0:
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(0, min(size, e + size if e < 0 else e))
            index[a] = slice(s, e, st)
        else:  # negative step: slice the flipped axis
            s = max(-1, min(size - 1, s + size if s < 0 else s))
            e = max(-1, min(size - 1, e + size if e < 0 else e))
            index[a] = slice(size - 1 - s, size - 1 - e, -st)
            flips.append(a)
    if flips:
        data = data.flip(flips)
    return [data[tuple(index)]]


@_op("Split")
def _split(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axis = int(attr(node, "axis", 0))
    sizes = _ints(_opt(x, 1)) or list(attr(node, "split", []) or [])
    if not sizes:
        n = len(node.output)
        total = x[0].shape[axis]
        chunk = math.ceil(total / n)
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    return list(torch.split(x[0], sizes, dim=axis))


@_op("Expand")
def _expand(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    shape = _ints(x[1])
    return [x[0] * torch.ones(shape, dtype=x[0].dtype)]  # numpy-style broadcast


@_op("Tile")
def _tile(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [x[0].repeat(*_ints(x[1]))]


@_op("ConstantOfShape")
def _const_of_shape(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    value = attr(node, "value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return [torch.full(_ints(x[0]), fill.reshape(-1)[0].item(), dtype=_np_dtype(fill.dtype))]


@_op("Range")
def _range(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


@_op("Pad")
def _pad(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _ints(_opt(x, 1)) if len(x) > 1 else list(attr(node, "pads"))
    value = _opt(x, 2)
    rank = x[0].dim()
    if len(x) > 3 and x[3] is not None:
        raise EngineError(
            "unsupported_op_for_training",
            f"Pad node {node.name!r} uses axes",
            {"op": "Pad", "node": node.name},
        )
    torch_pad: list[int] = []
    for i in reversed(range(rank)):
        torch_pad += [pads[i], pads[i + rank]]
    fill = float(value.item()) if value is not None and value.numel() else 0.0
    if mode == "constant":
        return [F.pad(x[0], torch_pad, value=fill)]
    return [F.pad(x[0], torch_pad[: 2 * (rank - 2)], mode={"edge": "replicate"}.get(mode, mode))]


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
        axes = _axes(node, x, m)
        keep = bool(attr(node, "keepdims", 1))
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], dim=tuple(axes), keepdim=keep)]

    return run


_op("ReduceMean")(_reduce(torch.mean))
_op("ReduceSum")(_reduce(torch.sum))
_op("ReduceMax")(_reduce(torch.amax))
_op("ReduceMin")(_reduce(torch.amin))


@_op("ArgMax")
def _argmax(node: onnx.NodeProto, x: list[Any], m: OnnxModule) -> list[Any]:
    axis = int(attr(node, "axis", 0))
    return [torch.argmax(x[0], dim=axis, keepdim=bool(attr(node, "keepdims", 1)))]


# Constant nodes are evaluated once at construction (see OnnxModule.__init__).
SUPPORTED_OPS: frozenset[str] = frozenset({*_OPS, "Constant"})


def _np_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=dtype)).dtype


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise EngineError(
        "unsupported_op_for_training",
        f"Constant node {node.name!r} holds a value kind the trainer cannot read",
        {"op": "Constant", "node": node.name},
    )


def check_trainable(model: onnx.ModelProto) -> None:
    """Raise ``unsupported_op_for_training`` naming the first op the bridge cannot run."""
    for index, node in enumerate(model.graph.node):
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            label = node.name or f"#{index}"
            raise EngineError(
                "unsupported_op_for_training",
                f"op {node.op_type!r} (node {label}) is not supported for training; "
                "training passes run ops of plain CNN/MLP/transformer graphs "
                "(no recurrent, control-flow, quantized or custom-domain ops)",
                {"op": node.op_type, "node": label, "domain": node.domain},
            )


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module (eager, node by node).

    ``forward(inputs)`` takes a dict ``{input name: tensor}`` and returns a dict of the graph
    outputs plus any tensor named in ``capture`` (for feature matching).

    ``weight_hook(node, input_index, tensor) -> tensor`` and ``activation_hook(name, tensor)
    -> tensor`` let quantization-aware training insert fake quantization without copying the
    graph walker.
    """

    def __init__(self, model: onnx.ModelProto, *, frozen: Iterable[str] = ()) -> None:
        super().__init__()
        check_trainable(model)
        self.model = model
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        frozen = set(frozen)
        roles: dict[str, bool] = {}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if (node.op_type, i) in _FROZEN_INPUTS:
                    roles[name] = False
        self._params = nn.ParameterDict()
        self._keys: dict[str, str] = {}  # onnx name -> ParameterDict key (dots are not allowed)
        self._consts: dict[str, torch.Tensor] = {}
        for tensor in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            trainable = (
                value.is_floating_point()
                and value.numel() > 1
                and roles.get(tensor.name, True)
                and tensor.name not in frozen
            )
            if trainable:
                key = f"p{len(self._keys)}"
                self._keys[tensor.name] = key
                self._params[key] = nn.Parameter(value.float())
            else:
                self._consts[tensor.name] = value
        for node in model.graph.node:
            if node.op_type == "Constant":
                self._consts[node.output[0]] = torch.from_numpy(_constant_value(node).copy())
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self.weight_hook: Callable[[onnx.NodeProto, int, torch.Tensor], torch.Tensor] | None = None
        self.activation_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def parameter(self, onnx_name: str) -> nn.Parameter | None:
        """The trainable parameter for initializer ``onnx_name`` (None when frozen)."""
        key = self._keys.get(onnx_name)
        return None if key is None else self._params[key]

    def named_onnx_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters keyed by ONNX initializer name."""
        return {name: self._params[key] for name, key in self._keys.items()}

    def forward(
        self, inputs: dict[str, torch.Tensor], capture: Iterable[str] = ()
    ) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = dict(self._consts)
        value: Any
        for name, key in self._keys.items():
            env[name] = self._params[key]
        for name in self.input_names:
            given = inputs[name]
            env[name] = self.activation_hook(name, given) if self.activation_hook else given
        for node in self.model.graph.node:
            if node.op_type == "Constant":
                continue
            args: list[Any] = []
            for i, name in enumerate(node.input):
                value = env[name] if name else None
                if self.weight_hook is not None and name in self._keys:
                    value = self.weight_hook(node, i, value)
                args.append(value)
            outs = _OPS[node.op_type](node, args, self)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    if self.activation_hook is not None and isinstance(value, torch.Tensor):
                        value = self.activation_hook(name, value)
                    env[name] = value
        wanted = [*self.output_names, *capture]
        return {name: env[name] for name in wanted}

    def write_back(self, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """A copy of ``model`` (default: the wrapped one) with the learned weights written in.

        Initializers keep their names and their original dtype (float16 stays float16).
        """
        out = copy.deepcopy(model if model is not None else self.model)
        params = self.named_onnx_parameters()
        for i, tensor in enumerate(out.graph.initializer):
            param = params.get(tensor.name)
            if param is None:
                continue
            dtype = numpy_helper.to_array(tensor).dtype
            value = param.detach().cpu().numpy().astype(dtype)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, tensor.name))
        return out
