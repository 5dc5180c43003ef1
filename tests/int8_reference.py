"""A reference of the int8 GEMM ONNX Runtime runs on x86 without VNNI, in numpy.

MLAS's AVX2 / AVX-512BW u8s8 kernels multiply with ``vpmaddubsw``: u8 activations times s8
weights, two products along K added into a signed int16 *with saturation*, then widened to
int32 (``vpmaddwd`` with ones) and accumulated. With VNNI (``vpdpbusd``) or AMX the same
products accumulate in int32 with no int16 step. ``u8s8_matmul`` computes either, so a test can
show what a model's int8 arithmetic gives on a CPU the suite does not run on.
``saturation_prone_mlp`` is the model the int8 tests (unit, end to end, emulated CPU) share.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def u8s8_matmul(a: np.ndarray, w: np.ndarray, *, saturate_pairs: bool) -> np.ndarray:
    """``a`` uint8 [M, K] times ``w`` int8 [K, N] -> int32 [M, N] (raw, zero points not
    subtracted: the kernels multiply the stored bytes and correct with row/column sums)."""
    a32 = a.astype(np.int32)
    w32 = w.astype(np.int32)
    if a32.shape[1] % 2:  # the kernels pad K with zeros
        a32 = np.pad(a32, ((0, 0), (0, 1)))
        w32 = np.pad(w32, ((0, 1), (0, 0)))
    even = a32[:, 0::2, None] * w32[None, 0::2, :]
    odd = a32[:, 1::2, None] * w32[None, 1::2, :]
    pairs = even + odd
    if saturate_pairs:
        pairs = np.clip(pairs, -32768, 32767)
    return pairs.sum(axis=1, dtype=np.int64).astype(np.int32)


def dynamic_quantize_u8(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """ONNX DynamicQuantizeLinear: uint8, range including 0, zero point rounded."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    q = np.clip(np.round(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def dynamic_int8_matmul(
    x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, w_zp: np.ndarray, *, saturate_pairs: bool
) -> np.ndarray:
    """A dynamically quantized MatMul (uint8 activations at run time, int8 weights with scale
    per tensor or per column) as the CPU computes it, dequantized to float."""
    q, a_scale, a_zp = dynamic_quantize_u8(x)
    raw = u8s8_matmul(q, w_q, saturate_pairs=saturate_pairs).astype(np.int64)
    w_zp = np.broadcast_to(np.asarray(w_zp, np.int64), (w_q.shape[1],))
    # sum_k (a - za)(w - zw) = sum aw - zw sum a - za sum w + K za zw
    k = w_q.shape[0]
    acc = (raw - w_zp[None, :] * q.astype(np.int64).sum(axis=1, keepdims=True)
           - a_zp * w_q.astype(np.int64).sum(axis=0)[None, :] + k * a_zp * w_zp[None, :])
    return (acc * a_scale * np.asarray(w_scale, np.float64)).astype(np.float32)


def saturation_prone_mlp() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x[N,256] (bright-image-like values in [0.3, 1]) -> MatMul w[256,32] -> y. Half the
    weight rows are large and repeated in adjacent pairs: full-range int8 weights of +-127 next
    to uint8 activations above 129 overflow the int16 pair sum of vpmaddubsw."""
    rng = np.random.default_rng(7)
    k, n = 256, 32
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    big = (0.5 * np.sign(rng.normal(size=(k // 4, n)))).astype(np.float32)
    w[0 : k // 2 : 2] = big
    w[1 : k // 2 : 2] = big
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "mlp",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", n])],
                         [nh.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    x = rng.uniform(0.3, 1.0, (64, k)).astype(np.float32)
    return model, x, x @ w


def quantized_weight(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    return inits["w_quantized"], inits["w_scale"], inits["w_zero_point"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
