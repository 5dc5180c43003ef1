"""int4_weight_only: MatMulNBits with configurable blocks, Gemm and subgraphs reached."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.passes.int4_weight_only import Int4WeightOnlyConfig
from tests import crafted


def test_block_size_must_be_a_power_of_two_in_range() -> None:
    for ok in (16, 32, 64, 128, 256):
        assert Int4WeightOnlyConfig(block_size=ok).block_size == ok
    for bad in (8, 48, 100, 512):
        with pytest.raises(ValueError):
            Int4WeightOnlyConfig(block_size=bad)
    config = Int4WeightOnlyConfig(block_size=128, symmetric=False, accuracy_level=1)
    assert Int4WeightOnlyConfig.model_validate_json(config.model_dump_json()) == config


def test_transformer_is_6x_smaller(kit, transformer) -> None:
    model = kit.load(transformer)
    run = kit.run("int4_weight_only", model)
    assert run.notes["quantized"] == 16
    assert kit.ops(run.model).get("com.microsoft.MatMulNBits") == 16
    assert kit.ratio(model, run.model) >= 6.0
    feeds = {k: v[:2] for k, v in transformer.inputs.items()}
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.99


def test_block_size_and_symmetry_trade_size(kit) -> None:
    model = kit.load(crafted.mlp())
    sizes = {
        (b, s): kit.run("int4_weight_only", model, block_size=b, symmetric=s).model.ByteSize()
        for b, s in ((32, True), (128, True), (32, False))
    }
    assert sizes[(128, True)] < sizes[(32, True)] < sizes[(32, False)]


def test_gemm_and_subgraph_matmuls_are_reached(kit) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (256, 128)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
        "gemm",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 128])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 256])],
        [nh.from_array(w, "w")],
    )
    gemm = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    run = kit.run("int4_weight_only", kit.load(gemm))
    assert run.notes["gemm_as_matmul"] == ["fc"]
    assert run.notes["quantized"] == 1
    x = rng.normal(0, 1, (4, 128)).astype(np.float32)
    assert kit.min_cosine(kit.outputs(gemm, {"x": x}), kit.outputs(run.model, {"x": x})) >= 0.99

    branches = kit.load(crafted.if_branch_weights())
    run = kit.run("int4_weight_only", branches)
    assert run.notes["quantized"] == 2  # one MatMul in each If branch
    assert kit.ratio(branches, run.model) >= 4.0


def test_models_without_matmul_weights_are_refused(kit, lstm) -> None:
    with pytest.raises(EngineError) as info:
        kit.run("int4_weight_only", kit.load(lstm))
    assert info.value.code == "no_effect"
    assert "LSTM" in info.value.message
    with pytest.raises(EngineError) as info:
        kit.run("int4_weight_only", kit.load(crafted.mlp()), nodes_to_exclude=["fc1", "fc2", "fc3"])
    assert info.value.code == "no_effect"
