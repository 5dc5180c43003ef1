"""fp16: half the bytes, float32 I/O, accuracy-sensitive ops kept float32, subgraphs reached."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.passes.fp16 import ACCURACY_BLOCK_LIST, Fp16Config
from tests import crafted


def _io_types(model) -> set[int]:
    return {
        v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)
    }


def test_config_round_trip() -> None:
    config = Fp16Config(op_block_list=["Softmax"], nodes_to_exclude=["head"])
    assert Fp16Config.model_validate_json(config.model_dump_json()) == config
    assert Fp16Config().op_block_list is None  # None = the default lists


def test_transformer_halves_and_keeps_sensitive_ops_float32(kit, transformer) -> None:
    model = kit.load(transformer)
    run = kit.run("fp16", model)
    assert kit.ratio(model, run.model) >= 1.9
    assert _io_types(run.model) == {T.FLOAT}
    assert {"LayerNormalization", "Softmax"} <= set(run.notes["blocked_op_types_present"])
    # A blocked op computes in float32: its inputs come through a Cast to float32.
    producers = {o: n for n in run.model.graph.node for o in n.output}
    for node in run.model.graph.node:
        if node.op_type == "Softmax":
            cast = producers[node.input[0]]
            assert cast.op_type == "Cast"
            assert next(a.i for a in cast.attribute if a.name == "to") == T.FLOAT
    feeds = {k: v[:2] for k, v in transformer.inputs.items()}
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.999


def test_digits_cnn_is_valid_and_faithful(kit, digits) -> None:
    model = kit.load(digits)
    run = kit.run("fp16", model)  # the toolkit runs onnx.checker: nodes sorted, names unique
    out = kit.outputs(run.model, digits.inputs)[0]
    ref = kit.outputs(model, digits.inputs)[0]
    assert out.dtype == np.float32
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # Exporter stack traces are gone (normalise drops them; the pass drops any left).
    assert not any(node.metadata_props for node in run.model.graph.node)


def test_subgraph_weights_become_fp16(kit) -> None:
    model = kit.load(crafted.if_branch_weights())
    run = kit.run("fp16", model)
    from service.engine.graph import iter_graphs

    sub_types = {t.data_type for g, d in iter_graphs(run.model.graph) if d for t in g.initializer}
    assert sub_types == {T.FLOAT16}
    x = np.random.default_rng(0).normal(0, 1, (3, 64)).astype(np.float32)
    for sign in (1.0, -1.0):
        feeds = {"x": np.abs(x) * sign}
        assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.999


def test_block_list_and_exclusions_are_configurable(kit) -> None:
    model = kit.load(crafted.mlp())
    run = kit.run("fp16", model, op_block_list=[], nodes_to_exclude=["fc3"])
    assert "fc3" in run.notes["nodes_kept_float32"]
    floats = {t.name for t in run.model.graph.initializer if t.data_type == T.FLOAT}
    assert "w3" in floats and "w1" not in floats
    assert set(ACCURACY_BLOCK_LIST) >= {"Exp", "Softmax", "LayerNormalization", "ReduceSum"}


def test_out_of_range_weights_are_counted(kit) -> None:
    w = np.full((64, 64), 0.01, np.float32)
    w[0, 0] = 1e6  # beyond fp16's 65504
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "big",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 64])],
        [nh.from_array(w, "w")],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    run = kit.run("fp16", model)
    assert run.notes["values_clamped_to_fp16_range"] == 1


def test_model_without_float_weights_is_no_effect(kit) -> None:
    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(EngineError) as info:
        kit.run("fp16", model)
    assert info.value.code == "no_effect"
