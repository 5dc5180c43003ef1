"""quantize_dynamic: int8 MatMul/Gemm/LSTM/GRU, Conv left alone, subgraph weights reached."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.graph import gemm_to_matmul
from service.engine.passes.quantize_dynamic import QuantizeDynamicConfig
from tests import crafted


def _gemm_model() -> onnx.ModelProto:
    """x[N,256] -> Gemm(transB=1, alpha=0.5, beta=2) -> Relu -> y[N,384]."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.1, (384, 256)).astype(np.float32)  # [out, in]: transB
    b = rng.normal(0, 0.1, (384,)).astype(np.float32)
    g = h.make_graph(
        [
            h.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
            h.make_node("Relu", ["g"], ["y"], name="relu"),
        ],
        "gemm",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 256])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 384])],
        [nh.from_array(w, "w"), nh.from_array(b, "b")],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_config_defaults_leave_conv_out_and_round_trip() -> None:
    config = QuantizeDynamicConfig()
    assert "Conv" not in config.op_types
    assert {"MatMul", "Gemm", "LSTM", "GRU"} <= set(config.op_types)
    again = QuantizeDynamicConfig.model_validate_json(config.model_dump_json())
    assert again == config
    with pytest.raises(ValueError):
        QuantizeDynamicConfig(op_types=["Softmax"])  # type: ignore[list-item]


def test_transformer_is_4x_smaller_and_faithful(kit, transformer, first) -> None:
    model = kit.load(transformer)
    run = kit.run("quantize_dynamic", model)
    assert kit.ratio(model, run.model) >= 3.5
    quantized = {q["node"] for q in run.notes["quantized"]}
    assert len(quantized) == 16  # qkv, proj, ff1, ff2 in 4 blocks
    # Attention score MatMuls multiply two activations: skipped, with the reason said.
    reasons = {s["reason"] for s in run.notes["skipped"]}
    assert any("activations" in r for r in reasons)
    feeds = first(transformer.inputs, 4)
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.99
    assert "com.microsoft.DynamicQuantizeMatMul" in kit.ops(
        run.model
    ) or "MatMulInteger" in kit.ops(run.model)


def test_lstm_uses_int8_kernel_and_keeps_states(kit, lstm, first) -> None:
    model = kit.load(lstm)
    run = kit.run("quantize_dynamic", model)
    assert kit.ratio(model, run.model) >= 3.5
    assert kit.ops(run.model).get("com.microsoft.DynamicQuantizeLSTM") == 2
    feeds = first(lstm.inputs, 8)
    ref, out = kit.outputs(model, feeds), kit.outputs(run.model, feeds)
    assert len(out) == 3  # logits, h_n, c_n: the state outputs must survive too
    assert kit.min_cosine(ref, out) >= 0.99


def test_gru_weights_stored_int8_and_said_so(kit, gru, first) -> None:
    model = kit.load(gru)
    run = kit.run("quantize_dynamic", model)
    assert kit.ratio(model, run.model) >= 3.5
    gru_items = [w for w in run.notes["weight_only_int8"] if w["op"] == "GRU"]
    assert len(gru_items) == 4  # W and R of two layers
    assert all("no dynamic int8 kernel" in w["reason"] for w in gru_items)
    feeds = first(gru.inputs, 8)
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.99


def test_weights_inside_if_branches_are_quantized(kit) -> None:
    model = kit.load(crafted.if_branch_weights())
    run = kit.run("quantize_dynamic", model)
    inside = [w for w in run.notes["weight_only_int8"] if w["in_subgraph"]]
    assert {w["node"] for w in inside} == {"mm_then", "mm_else"}
    assert kit.ratio(model, run.model) >= 3.0
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 64)).astype(np.float32)
    for sign in (1.0, -1.0):  # both branches
        feeds = {"x": np.abs(x) * sign}
        assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.99


def test_keep_float_subgraphs_means_nothing_to_do(kit) -> None:
    model = kit.load(crafted.if_branch_weights())
    with pytest.raises(EngineError) as info:
        kit.run("quantize_dynamic", model, subgraph_weights="keep_float")
    assert info.value.code == "no_effect"


def test_cnn_is_refused_with_a_pointer_to_static(kit, digits) -> None:
    model = kit.load(digits)
    with pytest.raises(EngineError) as info:
        kit.run("quantize_dynamic", model)
    assert info.value.code == "no_effect"
    assert "quantize_static" in info.value.message


def test_conv_on_request(kit) -> None:
    model = kit.load(crafted.constant_weights_opset11())
    run = kit.run("quantize_dynamic", model, op_types=["Conv", "MatMul"], min_elements=64)
    assert "ConvInteger" in kit.ops(run.model)


def test_gemm_becomes_int8_matmul_with_alpha_beta_folded(kit) -> None:
    model = _gemm_model()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert gemm_to_matmul(rewritten) == ["fc"]
    x = np.random.default_rng(1).normal(0, 1, (5, 256)).astype(np.float32)
    exact = kit.outputs(model, {"x": x})[0]
    np.testing.assert_allclose(kit.outputs(rewritten, {"x": x})[0], exact, rtol=1e-5, atol=1e-5)
    run = kit.run("quantize_dynamic", kit.load(model))
    assert run.notes["gemm_as_matmul"] == ["fc"]
    assert kit.ratio(model, run.model) >= 3.5
    assert kit.min_cosine([exact], kit.outputs(run.model, {"x": x})) >= 0.99


def test_exclusions_and_tiny_tensors_stay_float(kit) -> None:
    model = kit.load(crafted.mlp())  # fc1 64x512, fc2 512x512, fc3 512x10
    run = kit.run("quantize_dynamic", model, nodes_to_exclude=["fc2"], min_elements=8192)
    skipped = {s["node"]: s["reason"] for s in run.notes["skipped"]}
    assert "nodes_to_exclude" in skipped["fc2"]
    assert "min_elements" in skipped["fc3"]
    assert [q["node"] for q in run.notes["quantized"]] == ["fc1"]
    floats = {t.name for t in run.model.graph.initializer if t.data_type == T.FLOAT}
    assert {"w2", "w3"} <= floats


def test_nothing_quantizable_is_no_effect(kit) -> None:
    model = kit.load(crafted.mlp())
    with pytest.raises(EngineError) as info:
        kit.run("quantize_dynamic", model, min_elements=10**7)
    assert info.value.code == "no_effect"
    assert "min_elements" in info.value.message


def test_per_channel_auto_goes_per_channel_only_where_it_helps(kit) -> None:
    model = kit.load(crafted.mlp())
    even = kit.run("quantize_dynamic", model)
    assert even.notes["per_channel"] is False  # random weights: per tensor loses nothing
    # One output column 300x larger than the others: per-tensor int8 flattens the rest.
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    arr = nh.to_array(w1).copy()
    arr[:, 0] *= 300.0
    w1.CopyFrom(nh.from_array(arr, "w1"))
    uneven = kit.run("quantize_dynamic", model)
    assert uneven.notes["per_channel"] is True
    assert [e["node"] for e in uneven.notes["per_channel_evidence"]] == ["fc1"]
    forced = kit.run("quantize_dynamic", model, per_channel=False)
    x = np.random.default_rng(0).normal(0, 1, (32, 64)).astype(np.float32)
    ref = kit.outputs(model, {"x": x})
    # Activations stay per-tensor (dynamic), so the outlier still costs; per channel costs less.
    assert kit.min_cosine(ref, kit.outputs(uneven.model, {"x": x})) > kit.min_cosine(
        ref, kit.outputs(forced.model, {"x": x})
    )


def test_uint8_weights_use_zero_points_in_subgraphs_too(kit) -> None:
    model = kit.load(crafted.if_branch_weights())
    run = kit.run("quantize_dynamic", model, weight_type="uint8")
    from service.engine.graph import iter_graphs

    names = {t.name for g, _ in iter_graphs(run.model.graph) for t in g.initializer}
    assert {"w_then__zero_point", "w_else__zero_point"} <= names
    x = np.abs(np.random.default_rng(2).normal(0, 1, (4, 64)).astype(np.float32))
    assert kit.min_cosine(kit.outputs(model, {"x": x}), kit.outputs(run.model, {"x": x})) >= 0.99


def test_embedding_tables_of_a_bert_style_encoder(kit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The word table holds most bytes: int8 rows with per-row scales bring the file near
    ONNX Runtime's one-call quantize_dynamic (per-tensor table) instead of 1.5x."""
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    from tests.real_exports import bert_encoder

    path = bert_encoder(tmp_path / "bert.onnx")
    ort_quantize_dynamic(str(path), str(tmp_path / "ort.onnx"))
    ort_ratio = path.stat().st_size / (tmp_path / "ort.onnx").stat().st_size
    model = kit.load(onnx.load(str(path)))
    run = kit.run("quantize_dynamic", model)
    rows = [q for q in run.notes["quantized"] if q["op"] == "Gather"]
    assert {q["tensor"] for q in rows} >= {"words.weight"}
    assert kit.ratio(model, run.model) >= 0.95 * ort_ratio >= 3.5
    ops = kit.ops(run.model)
    assert ops.get("DequantizeLinear", 0) == 0  # rows dequantized after the lookup, not the table
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8000, (4, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 18:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.999


def test_embedding_rows_have_their_own_scales(kit) -> None:  # type: ignore[no-untyped-def]
    """Rows 1000x smaller than the largest survive (one scale per tensor rounds them to 0)."""
    rng = np.random.default_rng(1)
    table = rng.normal(0, 1, (512, 32)).astype(np.float32)
    table[256:] *= 1e-3
    g = h.make_graph([h.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)],
                     "emb", [h.make_tensor_value_info("ids", T.INT64, ["N"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
                     [nh.from_array(table, "table")])
    model = kit.load(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    run = kit.run("quantize_dynamic", model)
    ids = np.arange(256, 512, dtype=np.int64)
    (out,) = kit.outputs(run.model, {"ids": ids})
    np.testing.assert_allclose(out, table[256:], rtol=0.0, atol=float(np.abs(table[256:]).max()) / 200)
