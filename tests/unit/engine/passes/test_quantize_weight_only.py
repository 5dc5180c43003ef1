"""quantize_weight_only: int8 weights + DequantizeLinear on every weighted op, float compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from tests import crafted


def _embedding_encoder() -> onnx.ModelProto:
    """ids[N,S] -> Gather(table[4000,64]) -> MatMul w[64,64]: the table holds most bytes."""
    rng = np.random.default_rng(5)
    table = rng.normal(0, 0.5, (4000, 64)).astype(np.float32)
    w = rng.normal(0, 0.1, (64, 64)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
         h.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
        "enc", [h.make_tensor_value_info("ids", T.INT64, ["N", "S"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", "S", 64])],
        [nh.from_array(table, "table"), nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _folded(model: onnx.ModelProto, path: Path) -> ort.InferenceSession:
    onnx.save_model(model, str(path))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_conv_weights_of_a_cnn(kit, digits, first, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = kit.load(digits)
    run = kit.run("quantize_weight_only", model)
    assert kit.ratio(model, run.model) >= 3.5
    assert {w["op"] for w in run.notes["weight_only_int8"]} >= {"Conv"}
    assert "session.disable_quant_qdq" in run.notes["load_hint"]
    ops = kit.ops(run.model)
    assert ops.get("DequantizeLinear", 0) == len(run.notes["weight_only_int8"])
    assert not any(op.startswith(("QLinear", "ConvInteger", "MatMulInteger")) for op in ops)
    feeds = first(digits.inputs, 8)
    ref, out = kit.outputs(model, feeds), kit.outputs(run.model, feeds)
    assert kit.min_cosine(ref, out) >= 0.999
    # Loaded the way the hint says, it computes the same thing.
    folded = _folded(run.model, tmp_path / "w.onnx").run(None, feeds)
    for a, b in zip(out, folded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_embedding_tables_and_weights_in_if_branches(kit) -> None:  # type: ignore[no-untyped-def]
    model = kit.load(_embedding_encoder())
    run = kit.run("quantize_weight_only", model)
    assert {w["node"] for w in run.notes["weight_only_int8"]} == {"embed", "proj"}
    assert kit.ratio(model, run.model) >= 3.5
    ids = np.random.default_rng(0).integers(0, 4000, (4, 16)).astype(np.int64)
    assert kit.min_cosine(kit.outputs(model, {"ids": ids}),
                          kit.outputs(run.model, {"ids": ids})) >= 0.999
    branchy = kit.load(crafted.if_branch_weights())
    inside = kit.run("quantize_weight_only", branchy)
    assert {w["node"] for w in inside.notes["weight_only_int8"] if w["in_subgraph"]} == {
        "mm_then", "mm_else"}


def test_nothing_to_store_is_no_effect(kit) -> None:  # type: ignore[no-untyped-def]
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"], name="r")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(EngineError) as info:
        kit.run("quantize_weight_only", kit.load(model))
    assert info.value.code == "no_effect"
