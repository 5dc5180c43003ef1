"""The ONNX -> torch bridge: same numbers as ONNX Runtime, weights written back, precise refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.training.bridge import SUPPORTED_OPS, OnnxModule, check_trainable
from service.engine.training.distillation import run_onnx

RNG = np.random.default_rng(0)


def _f(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(0, scale, shape)).astype(np.float32), name)


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _vi(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _bridge(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    module = OnnxModule(model)
    with torch.no_grad():
        out = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in out.items()}


def cnn_model() -> onnx.ModelProto:
    """Conv(pads asym) -> BN -> LeakyRelu -> MaxPool -> AvgPool -> Reshape -> Gemm -> Softmax."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 0, 0, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"]),
        helper.make_node("LeakyRelu", ["bn"], ["r1"], alpha=0.1),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Shape", ["p2"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["p2", "newshape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1, alpha=0.5),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inits = [
        _f("w1", 6, 3, 3, 3),
        _f("b1", 6),
        _f("g", 6),
        _f("beta", 6),
        _f("mean", 6),
        numpy_helper.from_array(RNG.uniform(0.5, 2, 6).astype(np.float32), "var"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        _i64("axes0", [0]),
        _i64("minus1", [-1]),
        _f("w2", 5, 6 * 2 * 2),
        _f("b2", 5),
    ]
    return _model(nodes, inits, [_vi("x", "n", 3, 8, 8)], [_vi("probs", "n", 5)])


def transformer_block() -> onnx.ModelProto:
    """LayerNorm -> MatMul -> Gelu(Erf form) -> MatMul -> Add residual -> ReduceMean/Pow/Sqrt."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Div", ["hb", "sqrt2"], ["hd"]),
        helper.make_node("Erf", ["hd"], ["he"]),
        helper.make_node("Add", ["he", "one"], ["he1"]),
        helper.make_node("Mul", ["hb", "he1"], ["hm"]),
        helper.make_node("Mul", ["hm", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["res"]),
        helper.make_node("Transpose", ["res"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Pow", ["t", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=0),
        helper.make_node("Sqrt", ["ms"], ["rms"]),
        helper.make_node("Sigmoid", ["rms"], ["y"]),
    ]
    inits = [
        _f("ln_g", 8),
        _f("ln_b", 8),
        _f("w1", 8, 16),
        _f("b1", 16),
        _f("w2", 16, 8),
        numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(2, np.float32), "two"),
        _i64("axes", [1]),
    ]
    return _model(nodes, inits, [_vi("x", "n", 4, 8)], [_vi("y", "n", 4)], opset=18)


@pytest.mark.parametrize("build,shape", [(cnn_model, (4, 3, 8, 8)), (transformer_block, (3, 4, 8))])
def test_bridge_matches_onnxruntime(build, shape):
    model = build()
    feeds = {"x": RNG.normal(0, 1, shape).astype(np.float32)}
    ours = _bridge(model, feeds)
    ref = run_onnx(model, feeds)
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=1e-5)


def test_parameters_and_frozen_statistics():
    module = OnnxModule(cnn_model())
    params = module.named_onnx_parameters()
    assert {"w1", "b1", "g", "beta", "w2", "b2"} <= set(params)
    # BatchNorm running statistics and integer shape tensors are not trained.
    assert "mean" not in params and "var" not in params and "minus1" not in params


def test_write_back_changes_only_weights():
    model = cnn_model()
    module = OnnxModule(model)
    with torch.no_grad():
        module.parameter("w2").mul_(2.0)
    out = module.write_back()
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    after = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w2"))
    np.testing.assert_allclose(after, 2 * before)
    assert out.graph.initializer[0].data_type == TensorProto.FLOAT
    # The written-back model computes what the module computes.
    feeds = {"x": RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(
        run_onnx(out, feeds)["probs"], _bridge(out, feeds)["probs"], rtol=1e-4, atol=1e-6
    )


def test_gradients_reach_every_trainable_weight():
    module = OnnxModule(transformer_block())
    out = module({"x": torch.randn(2, 4, 8)})["y"]
    out.sum().backward()
    for name, p in module.named_onnx_parameters().items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_unsupported_op_is_named_with_its_node():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="act"),
        helper.make_node("TopK", ["r", "k"], ["v", "i"], name="pick_best", axis=-1),
    ]
    model = _model(nodes, [_i64("k", [2])], [_vi("x", "n", 6)], [_vi("v", "n", 2)])
    with pytest.raises(EngineError) as info:
        OnnxModule(model)
    assert info.value.code == "unsupported_op_for_training"
    assert "TopK" in info.value.message and "pick_best" in info.value.message
    assert info.value.details == {"op": "TopK", "node": "pick_best", "domain": ""}


def test_custom_domain_ops_are_refused():
    node = helper.make_node("FusedThing", ["x"], ["y"], domain="com.example", name="f")
    graph = helper.make_graph([node], "g", [_vi("x", 1)], [_vi("y", 1)])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(EngineError, match="FusedThing"):
        check_trainable(model)


def test_op_table_covers_exported_cnn_and_transformer_ops():
    needed = {
        "Conv",
        "Gemm",
        "MatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Gelu",
        "Erf",
        "Softmax",
        "LogSoftmax",
        "BatchNormalization",
        "LayerNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Flatten",
        "Reshape",
        "Transpose",
        "Concat",
        "Squeeze",
        "Unsqueeze",
        "Shape",
        "Gather",
        "Slice",
        "Dropout",
        "Identity",
        "Cast",
        "Constant",
        "ReduceMean",
        "Pow",
        "Sqrt",
        "ConvTranspose",
    }
    assert needed <= SUPPORTED_OPS
