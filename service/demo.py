"""The bundled demo model: a deterministic float MLP for 8x8 digit images (64 -> 10 classes).

Built from a fixed seed with onnx.helper, so the quickstart needs no download and no training.
Its weights dominate the file, as in most real models, so int8 shows its real effect (~4x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_demo_model(path: Path, hidden: int = 768, seed: int = 2026) -> Path:
    rng = np.random.default_rng(seed)
    dims = [64, hidden, hidden, 10]
    nodes, inits = [], []
    current = "image"
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"fc{i}.weight"),
            numpy_helper.from_array(b, f"fc{i}.bias"),
        ]
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(
            helper.make_node(
                "Gemm",
                [current, f"fc{i}.weight", f"fc{i}.bias"],
                [out + ("_pre" if out != "logits" else "")],
            )
        )
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "edgepress_demo_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgepress-demo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
