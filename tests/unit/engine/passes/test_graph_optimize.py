"""graph_optimize: ONNX Runtime offline optimisation; the shared graph helpers; registry."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from service.engine.errors import EngineError
from service.engine.graph import toposort
from service.engine.passes.graph_optimize import GraphOptimizeConfig
from service.engine.registry import registered_passes
from tests import crafted

MINE = ("quantize_dynamic", "quantize_static", "fp16", "int4_weight_only", "graph_optimize")


def test_quantization_passes_are_registered_with_documented_configs() -> None:
    passes = registered_passes()
    for name in MINE:
        cls = passes[name]
        assert cls.description
        config = cls.config_model()
        assert cls.config_model.model_validate_json(config.model_dump_json()) == config
        for field_name, field in cls.config_model.model_fields.items():
            assert field.description, f"{name}.{field_name} has no description"
        with pytest.raises(ValueError):
            config.__class__.model_validate({"no_such_option": 1})


def test_extended_level_fuses_conv_relu(kit, digits) -> None:
    model = kit.load(digits)
    run = kit.run("graph_optimize", model, level="extended")
    assert "com.microsoft.FusedConv" in run.notes["new_op_types"]
    assert run.notes["nodes_after"] < run.notes["nodes_before"]
    assert "ONNX Runtime" in run.notes["portability"]
    ref = kit.outputs(model, digits.inputs)[0]
    np.testing.assert_allclose(kit.outputs(run.model, digits.inputs)[0], ref, rtol=1e-4, atol=1e-4)


def test_all_level_says_it_is_tied_to_the_cpu(kit) -> None:
    run = kit.run("graph_optimize", kit.load(crafted.constant_weights_opset11()), level="all")
    assert "CPU" in run.notes["portability"]
    assert GraphOptimizeConfig().level == "extended"


def test_nothing_to_rewrite_is_no_effect(kit) -> None:
    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(EngineError) as info:
        kit.run("graph_optimize", model, level="basic")
    assert info.value.code == "no_effect"


def test_toposort_repairs_appended_producers() -> None:
    g = h.make_graph(
        [
            h.make_node("Relu", ["a"], ["y"], name="second"),
            h.make_node("Neg", ["x"], ["a"], name="first"),
        ],
        "unsorted",
        [h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info("y", T.FLOAT, [2])],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    assert toposort(model) == 2
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["first", "second"]
