"""Weight-only quantization one tensor at a time, for models whose weights stay on disk.

What ``int4_weight_only`` (method rtn) and ``quantize_weight_only`` run on a model kept in
external data (``service.engine.external``, ``IngestedModel.external_bytes``): for each weight
they quantize, the float tensor is mapped from its verified file (``read_tensor``), quantized,
its result appended to the pass's own data file (``ExternalWriter``) and dropped before the
next one; the float tensor leaves the graph. Nothing holds the whole model in memory: the
process keeps one float weight's pages mapped and its quantized form at a time.

- int4: ONNX Runtime's own C++ block quantizer (``quantize_matmul_4bits``, what
  ``MatMulNBitsQuantizer`` runs for RTN), the same codes, scales and zero points as the
  in-memory RTN path, written as ``MatMulNBits``; or a ``Rounding`` of the pass's (GPTQ's
  codes, AWQ's codes of its scaled weights) fed with activations captured a few layers at a
  time (``int4_weight_only.StreamingCapture``). The LM head can stay float or go int8.
- int8: one symmetric scale per output channel (``max |w| / 127``), int8 codes and a
  ``DequantizeLinear`` in front of the MatMul/Gemm (written here: the in-memory pass's
  ``int8.weight_only_int8`` needs the model in memory); embedding tables (``Gather`` of a
  constant 2-D table, main graph) as int8 rows with one scale per row, dequantized after the
  lookup (``Gather`` of codes and of scales, ``Mul``), so only the rows looked up turn float.
- int4 embedding tables: ONNX Runtime's ``GatherBlockQuantized`` (blocks along the embedding
  dimension), the codes, scales and zero points of its quantizer's ``quantize_ndarray`` (what
  the in-memory pass's ``quantize_gather`` runs) computed ``ROWS`` rows of the table at a time,
  so the same bytes as the in-memory pass.

Main graph only: weights inside If/Loop/Scan bodies stay float (noted). Other op types (Conv,
recurrent layers) stay float on this path (noted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.external import ExternalWriter, external_bytes, read_tensor

ROWS = 4096  # rows of a weight quantized at once by the int8 path (bounded temporaries)


@dataclass
class StreamResult:
    """The rewritten model and what was done (for the pass's notes)."""

    model: onnx.ModelProto
    quantized: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    zero_point_corrections: int = 0  # float zero points written beside the fast kernel

    def notes(self) -> dict[str, Any]:
        return {"streamed": True, "quantized": len(self.quantized),
                "quantized_nodes": self.quantized[:200], "skipped": self.skipped[:200],
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "note": "weights read one tensor at a time from external data and written to "
                        "the output's external data; main graph only"}


def model_bytes(model: onnx.ModelProto) -> int:
    """The graph's own bytes plus its weights in external files."""
    return model.ByteSize() + external_bytes(model)


def _float_2d(t: TensorProto | None) -> bool:
    return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the graph only: external weights are references
    return out


def pack_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
               block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 ``codes`` [K, N], ``scales``/``zeros`` [K/block_size, N] in the layout of ONNX
    Runtime's MatMulNBits: B [N, blocks, block/2] (low nibble first), scales [N, blocks],
    zero points [N, ceil(blocks/2)] per column (None: symmetric, the implicit 8)."""
    k, n = codes.shape
    blocks = scales.shape[0]
    padded = np.zeros((blocks * block_size, n), np.uint8)
    padded[:k] = codes
    per_column = padded.T.reshape(n, blocks, block_size)
    packed = np.ascontiguousarray(per_column[..., ::2] | (per_column[..., 1::2] << 4))
    zp = None
    if zeros is not None:
        full = np.full((n, blocks + blocks % 2), 8, np.uint8)
        full[:, :blocks] = zeros.T
        zp = np.ascontiguousarray(full[:, ::2] | (full[:, 1::2] << 4))
    return packed, np.ascontiguousarray(scales.T.astype(np.float32)), zp


def zero_point_correction(node_name: str, x: str, nbits_output: str, output: str,
                          blocks: int, block_size: int, correction: str,
                          ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes (and their two small constant initializers) that add ``blocksum(x) @ C`` to a
    MatMulNBits output written without zero points (the implicit 8): with
    ``C[b, n] = (8 - z[b, n]) s[b, n]`` (the initializer ``correction``, [blocks, N]) this
    makes it exactly the MatMul with float zero points ``z``, ``(q - z) s = (q - 8) s +
    (8 - z) s``; ONNX Runtime's CPU MatMulNBits has a fast kernel only without float zero
    points. Needs K = ``blocks * block_size``."""
    base = f"{node_name}_zp"
    shape = numpy_helper.from_array(np.array([-1, blocks, block_size], np.int64),
                                    f"{node_name}_zp_blocks")
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{node_name}_zp_axes")
    nodes = [
        helper.make_node("Reshape", [x, shape.name], [f"{base}_x"], name=f"{base}_x"),
        helper.make_node("ReduceSum", [f"{base}_x", axes.name], [f"{base}_sum"], keepdims=0,
                         name=f"{base}_sum"),
        helper.make_node("MatMul", [f"{base}_sum", correction], [f"{base}_mm"],
                         name=f"{base}_mm"),
        helper.make_node("Shape", [nbits_output], [f"{base}_shape"], name=f"{base}_shape"),
        helper.make_node("Reshape", [f"{base}_mm", f"{base}_shape"], [f"{base}_y"],
                         name=f"{base}_y"),
        helper.make_node("Add", [nbits_output, f"{base}_y"], [output], name=f"{base}_add"),
    ]
    return nodes, [shape, axes]


class Rounding:
    """How ``int4_stream`` rounds one weight: ``quantize(node, w)`` returns (int4 codes
    [K, N] 0..15, scales and zero points [blocks, N] (zero points None: symmetric, the
    implicit 8; float zero points, HQQ's: written as a correction beside the fast kernel,
    ``zero_point_correction``), and per-input-channel scales ``s`` or None: the codes are of
    ``diag(s) w`` and the MatMul reads ``x / s``), or None: RTN (ONNX Runtime's C++
    quantizer)."""

    name = "rtn"

    def quantize(self, node: onnx.NodeProto, w: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        return None


def int4_stream(
    model: onnx.ModelProto, workdir: Path, *, block_size: int, symmetric: bool,
    accuracy_level: int | None, min_elements: int, exclude: set[str], heads: set[str],
    lm_head: str, rounding: Rounding | None = None,
    check_cancelled: Callable[[], None] = lambda: None,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
) -> StreamResult:
    """Main-graph MatMuls with a constant 2-D float B as int4 ``MatMulNBits``, one weight at a
    time: ONNX Runtime's RTN block quantizer, or ``rounding``'s (GPTQ, AWQ);
    ``heads`` (the LM heads) go int4, int8 or stay float as ``lm_head`` says."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rounding = rounding or Rounding()
    out, result, inits, readers = _begin(model)
    graph = out.graph
    nodes: list[onnx.NodeProto] = []
    todo = sum(1 for n in graph.node if n.op_type == "MatMul")
    with ExternalWriter(workdir / "int4.data") as writer:
        for index, node in enumerate(list(graph.node)):
            w_t = inits.get(node.input[1]) if node.op_type == "MatMul" and len(
                node.input) > 1 else None
            if node.op_type != "MatMul" or w_t is None or not _float_2d(w_t):
                nodes.append(node)
                continue
            k, n = (int(d) for d in w_t.dims)
            reason = _skip_reason(node, w_t, exclude, min_elements, readers) or (
                "LM head kept float" if node.name in heads and lm_head == "float" else None)
            if reason is not None:
                result.skipped.append({"node": node.name, "reason": reason})
                nodes.append(node)
                continue
            check_cancelled()
            if node.name in heads and lm_head == "int8":
                nodes.extend(_int8_matmul(node, w_t, writer, graph))
                result.quantized.append(node.name)
                continue
            w = np.asarray(read_tensor(w_t), np.float32)
            rounded = rounding.quantize(node, w)
            channel_scale = None
            float_zeros = None
            if rounded is not None:
                codes, scales_kn, zeros_kn, channel_scale = rounded
                if zeros_kn is not None and zeros_kn.dtype.kind == "f":
                    float_zeros, zeros_kn = zeros_kn, None
                packed, scales, zero = pack_nbits(codes, scales_kn, zeros_kn, block_size)
            else:
                blocks = -(-k // block_size)
                if blocks * block_size != k:
                    w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
                packed = np.zeros((n, blocks, block_size // 2), np.uint8)
                scales = np.zeros((n, blocks), np.float32)
                zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
                quantize_matmul_4bits(packed, np.ascontiguousarray(w), scales, zero,
                                      block_size, n, k, symmetric)
                if symmetric:
                    zero = None
            del w
            base = w_t.name
            tensors = [writer.add(packed, base + "_Q4"), writer.add(scales, base + "_scales")]
            if zero is not None:
                tensors.append(writer.add(zero, base + "_zero_points"))
            outputs = list(node.output)
            if float_zeros is not None:
                blocks = scales.shape[1]
                if blocks * block_size == k:  # exact beside the fast kernel
                    correction = writer.add(
                        ((8.0 - float_zeros) * scales.T).astype(np.float32),
                        base + "_zp_correction")
                    extra, consts = zero_point_correction(
                        node.name, node.input[0], f"{node.output[0]}_nbits", node.output[0],
                        blocks, block_size, correction.name)
                    graph.initializer.extend([correction, *consts])
                    outputs[0] = f"{node.output[0]}_nbits"
                    result.zero_point_corrections += 1
                else:  # float zero points as they are (ONNX Runtime's slower kernel)
                    tensors.append(writer.add(np.ascontiguousarray(
                        float_zeros.T.astype(np.float32)), base + "_zero_points"))
                    extra = []
            else:
                extra = []
            graph.initializer.extend(tensors)
            source = node.input[0]
            if channel_scale is not None:
                inverse = writer.add((1.0 / channel_scale).astype(np.float32),
                                     base + "_awq_inv_scale")
                graph.initializer.append(inverse)
                source = f"{node.input[0]}_awq_{index}"
                nodes.append(helper.make_node("Mul", [node.input[0], inverse.name], [source],
                                              name=f"{node.name}_awq_scale"))
            attrs: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": block_size}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            nodes.append(helper.make_node(
                "MatMulNBits", [source, *(t.name for t in tensors)], outputs,
                name=node.name + "_Q4", domain="com.microsoft", **attrs))
            nodes.extend(extra)
            result.quantized.append(node.name)
            progress((index + 1) / max(todo, 1), f"int4 {rounding.name} {node.name}")
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return _finish(out, nodes, result)


def int8_weight_only(
    model: onnx.ModelProto, workdir: Path, *, op_types: set[str], min_elements: int,
    exclude: set[str], check_cancelled: Callable[[], None] = lambda: None,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
) -> StreamResult:
    """Main-graph MatMul/Gemm weights as int8 + DequantizeLinear (a scale per output channel)
    and Gather tables as int8 rows (a scale per row), one weight at a time."""
    out, result, inits, readers = _begin(model)
    graph = out.graph
    nodes: list[onnx.NodeProto] = []
    with ExternalWriter(workdir / "int8.data") as writer:
        for index, node in enumerate(list(graph.node)):
            slot = {"MatMul": 1, "Gemm": 1, "Gather": 0}.get(node.op_type)
            w_t = inits.get(node.input[slot]) if slot is not None and len(
                node.input) > slot else None
            if node.op_type not in op_types or w_t is None or not _float_2d(w_t):
                if (node.op_type in op_types and node.op_type not in ("MatMul", "Gemm",
                                                                      "Gather")
                        and any(i in inits for i in node.input[1:])):
                    result.skipped.append({"node": node.name, "reason": f"{node.op_type} "
                                           "weights stay float on the streaming path"})
                nodes.append(node)
                continue
            reason = _skip_reason(node, w_t, exclude, min_elements, readers) or (
                "Gather not along the table's rows"
                if node.op_type == "Gather" and _attr(node, "axis", 0) != 0 else None)
            if reason is not None:
                result.skipped.append({"node": node.name, "reason": reason})
                nodes.append(node)
                continue
            check_cancelled()
            if node.op_type == "Gather":
                nodes.extend(_int8_gather(node, w_t, writer, graph))
            else:
                nodes.extend(_int8_matmul(node, w_t, writer, graph))
            result.quantized.append(node.name)
            progress((index + 1) / max(len(graph.node), 1), f"int8 {node.name}")
    return _finish(out, nodes, result)


def int4_tables(
    model: onnx.ModelProto, workdir: Path, *, block_size: int, symmetric: bool,
    min_elements: int, exclude: set[str], check_cancelled: Callable[[], None] = lambda: None,
) -> StreamResult:
    """Main-graph Gathers along the rows of a constant 2-D float table as int4
    ``GatherBlockQuantized``, one table at a time and ``ROWS`` rows of it at once."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    out, result, inits, readers = _begin(model)
    graph = out.graph
    nodes: list[onnx.NodeProto] = []
    with ExternalWriter(workdir / "int4_tables.data") as writer:
        for node in list(graph.node):
            w_t = inits.get(node.input[0]) if node.op_type == "Gather" else None
            if w_t is None or not _float_2d(w_t):
                nodes.append(node)
                continue
            reason = _skip_reason(node, w_t, exclude, min_elements, readers) or (
                "Gather not along the table's rows" if _attr(node, "axis", 0) != 0 else None)
            if reason is not None:
                result.skipped.append({"node": node.name, "reason": reason})
                nodes.append(node)
                continue
            check_cancelled()
            w = read_tensor(w_t)
            codes, scales, zeros = [], [], []
            for i in range(0, w.shape[0], ROWS):  # ROWS is even: packed halves stay aligned
                q, s, z = DefaultWeightOnlyQuantizer.quantize_ndarray(
                    np.asarray(w[i:i + ROWS], np.float32), 1, block_size, symmetric)
                codes.append(q)
                scales.append(s)
                if z is not None:
                    zeros.append(z)
            del w
            base = w_t.name
            qtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
            scale = np.concatenate(scales)
            tensors = [writer.add(np.concatenate(codes), base + "_Q4", qtype, list(w_t.dims)),
                       writer.add(scale, base + "_scales")]
            if zeros:
                tensors.append(writer.add(np.concatenate(zeros), base + "_zero_points", qtype,
                                          list(scale.shape)))
            graph.initializer.extend(tensors)
            names = [t.name for t in tensors]
            nodes.append(helper.make_node(
                "GatherBlockQuantized", [names[0], node.input[1], *names[1:]],
                [node.output[0]], name=node.name + "_Q4", domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=block_size))
            result.quantized.append(node.name)
    if result.quantized:
        out.ir_version = max(out.ir_version, 10)  # INT4/UINT4 tensors
        if not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return _finish(out, nodes, result)


def _begin(model: onnx.ModelProto) -> tuple[
        onnx.ModelProto, StreamResult, dict[str, TensorProto], Counter]:
    """A copy of ``model`` to rewrite, its result, its initializers by name and how many node
    inputs read each value."""
    out = _copy(model)
    inits = {t.name: t for t in out.graph.initializer}
    readers = Counter(i for n in out.graph.node for i in n.input)
    return out, StreamResult(out, bytes_before=model_bytes(model)), inits, readers


def _finish(out: onnx.ModelProto, nodes: list[onnx.NodeProto],
            result: StreamResult) -> StreamResult:
    """``out``'s graph with ``nodes`` in place of its own, unused initializers dropped."""
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _drop_unused(out.graph)
    result.bytes_after = model_bytes(out)
    return result


def _skip_reason(node: onnx.NodeProto, w_t: TensorProto, exclude: set[str], min_elements: int,
                 readers: Counter) -> str | None:
    """Why a weight both streaming passes could rewrite stays as it is, or None."""
    numel = int(np.prod(w_t.dims))
    if node.name in exclude:
        return "excluded"
    if numel < min_elements:
        return f"{numel} elements < min_elements"
    if readers[w_t.name] > 1:
        return "weight shared with another node"
    return None


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _int8_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``w`` (2-D) with one scale per index of ``axis``, computed a
    block of rows at a time."""
    k = w.shape[0]
    if axis == 1:  # a scale per column: the largest magnitude over every row
        peak = np.zeros(w.shape[1], np.float32)
        for i in range(0, k, ROWS):
            peak = np.maximum(peak, np.abs(w[i:i + ROWS]).max(axis=0))
    else:
        peak = np.concatenate([np.abs(w[i:i + ROWS]).max(axis=1) for i in range(0, k, ROWS)])
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.empty(w.shape, np.int8)
    for i in range(0, k, ROWS):
        part = w[i:i + ROWS] / (scale if axis == 1 else scale[i:i + ROWS, None])
        codes[i:i + ROWS] = np.clip(np.round(part), -127, 127)
    return codes, scale


def _int8_matmul(node: onnx.NodeProto, w_t: TensorProto, writer: ExternalWriter,
                 graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``node`` reading its weight through DequantizeLinear from int8 codes (per channel)."""
    axis = 0 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 1
    codes, scale = _int8_rows(np.asarray(read_tensor(w_t), np.float32), axis)
    base = w_t.name
    q = writer.add(codes, base + "_int8")
    s = writer.add(scale, base + "_int8_scale")
    zp = helper.make_tensor(base + "_int8_zero", TensorProto.INT8, [len(scale)],
                            np.zeros(len(scale), np.int8).tobytes(), raw=True)
    graph.initializer.extend([q, s, zp])
    dq = helper.make_node("DequantizeLinear", [q.name, s.name, zp.name], [base + "_dq"],
                          name=base + "_dq", axis=axis)
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    rewritten.input[1] = dq.output[0]
    return [dq, rewritten]


def _int8_gather(node: onnx.NodeProto, w_t: TensorProto, writer: ExternalWriter,
                 graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """An embedding lookup on int8 rows: Gather codes and row scales, Cast, Mul."""
    codes, scale = _int8_rows(np.asarray(read_tensor(w_t), np.float32), 0)
    base = w_t.name
    q = writer.add(codes, base + "_int8")
    s = writer.add(scale.reshape(-1, 1), base + "_int8_scale")
    graph.initializer.extend([q, s])
    ids = node.input[1]
    out = node.output[0]
    return [
        helper.make_node("Gather", [q.name, ids], [out + "_q"], name=node.name + "_q", axis=0),
        helper.make_node("Gather", [s.name, ids], [out + "_s"], name=node.name + "_s", axis=0),
        helper.make_node("Cast", [out + "_q"], [out + "_f"], name=node.name + "_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=node.name + "_mul"),
    ]
