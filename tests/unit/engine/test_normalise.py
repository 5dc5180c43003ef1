"""Normalisation keeps what a model computes and its dynamic dims, and exposes every weight."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.normalise import iter_graphs, iter_initializers, normalise
from tests import crafted


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for g, _ in iter_graphs(model.graph) for n in g.node]


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_constant_weights_at_opset_11_become_initializers_at_opset_13() -> None:
    model = crafted.constant_weights_opset11()
    out, notes = normalise(model)
    assert "Constant" not in _ops(out)
    assert "Transpose" not in _ops(out)  # Transpose(constant) folded into the weight
    assert out.opset_import[0].version == 13
    assert any("opset upgraded from 11 to 13" in n for n in notes)
    assert any("Constant nodes folded" in n for n in notes)
    names = {t.name for _, t in iter_initializers(out)}
    assert {"conv_w", "fc_w", "out_w"} <= names
    fc_w = next(t for _, t in iter_initializers(out) if t.name == "fc_w")
    assert list(fc_w.dims) == [512, 192]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    _same_outputs(model, out, {"x": x})
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    _same_outputs(model, out, {"x": x})  # still dynamic in batch


@pytest.mark.parametrize("opset", [11, 13])
def test_weights_inside_if_branches_are_reachable(opset: int) -> None:
    model = crafted.if_branch_weights()
    model.opset_import[0].version = opset
    model.ir_version = 6 if opset == 11 else 7
    out, _ = normalise(model)
    assert "Constant" not in _ops(out)
    assert "If" in _ops(out)  # the subgraph stays a subgraph
    where = {t.name: g.name for g, t in iter_initializers(out)}
    assert where["w_then"] == "then_branch" and where["w_else"] == "else_branch"
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):  # both branches
        x = (np.abs(rng.standard_normal((2, 64))) * sign).astype(np.float32)
        _same_outputs(model, out, {"x": x})


def test_weights_inside_a_loop_body_are_reachable() -> None:
    model = crafted.loop_body_weights()
    out, notes = normalise(model)
    assert "Loop" in _ops(out) and "Constant" not in _ops(out)
    assert "Identity" in _ops(out)  # the body's condition output must stay
    where = {t.name: g.name for g, t in iter_initializers(out)}
    assert where["w_loop"] == "loop_body"
    x = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    _same_outputs(model, out, {"x": x})


def test_dynamic_dims_are_kept_and_model_unchanged() -> None:
    model = crafted.dynamic_dims()
    out, notes = normalise(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "seq"]
    ids = np.random.default_rng(0).integers(0, 100, (2, 7))
    _same_outputs(model, out, {"ids": ids})
    assert notes == []


def test_initializers_listed_as_inputs_become_constants() -> None:
    model = crafted.mlp()
    for t in model.graph.initializer:
        model.graph.input.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out, notes = normalise(model)
    assert [v.name for v in out.graph.input] == ["x"]
    assert any("graph inputs made constant" in n for n in notes)


def test_folding_is_bounded_and_identities_and_dead_nodes_go() -> None:
    shape = nh.from_array(np.array([1000, 1000], np.int64), "shape")
    nodes = [
        h.make_node("ConstantOfShape", ["shape"], ["big"], name="cos"),  # 2 -> 1e6 elements
        h.make_node("ReduceSum", ["big"], ["s"], name="rs", keepdims=0),
        h.make_node("Identity", ["x"], ["xi"], name="id"),
        h.make_node("Add", ["xi", "s"], ["y"], name="add"),
        h.make_node("Neg", ["x"], ["unused"], name="dead"),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [shape])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    out, notes = normalise(model)
    ops = _ops(out)
    assert "ConstantOfShape" in ops  # not materialised as a 4 MB initializer
    assert "Identity" not in ops and "Neg" not in ops
    assert all(np.prod(t.dims) < 1000 for _, t in iter_initializers(out))
    x = np.ones((2, 4), np.float32)
    _same_outputs(model, out, {"x": x})


def test_node_names_become_unique() -> None:
    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["a"], name="n"), h.make_node("Neg", ["a"], ["b"], name="n"),
         h.make_node("Abs", ["b"], ["y"])],
        "g", [h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info("y", T.FLOAT, [2])])
    out, _ = normalise(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == 3 and all(names)


def test_opset_upgrade_failure_is_precise() -> None:
    params = [nh.from_array(np.ones(3, np.float32), n) for n in "abcd"]
    g = h.make_graph([h.make_node("BatchNormalization", ["x", "a", "b", "c", "d"], ["y"],
                                  spatial=0)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 4, 4])], params)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 7)], ir_version=4)
    with pytest.raises(EngineError) as info:
        normalise(model)
    assert info.value.code == "unsupported_model"
    assert "opset 7" in info.value.message and "spatial" in info.value.message
    assert "/project" not in info.value.message


def test_quantized_structure_is_not_folded() -> None:
    model = crafted.already_quantized_qdq()
    out, _ = normalise(model)
    assert _ops(out).count("DequantizeLinear") == 2
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    _same_outputs(model, out, {"x": x})
