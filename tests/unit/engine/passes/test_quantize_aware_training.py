"""quantize_aware_training: QDQ export that reproduces training's fake quantization, and the
proof that it beats post-training quantize_static where static int8 loses accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.devices import host_profile
from service.engine.errors import EngineError
from service.engine.int8_encoding import choose_int8_encoding
from service.engine.registry import PassContext, get_pass
from service.engine.training.bridge import OnnxModule
from service.engine.training.distillation import accuracy, run_onnx
from service.engine.training.fake_quant import FakeQuantizedModule, export_qdq, plan_quantization
from service.engine.training.graph import get_array, set_array
from tests import corpus


def _run(name: str, model: onnx.ModelProto, tmp: Path, ctx: dict, **kw):
    cls = get_pass(name)
    context = PassContext(workdir=tmp, **ctx)
    out = cls().run(model, cls.config_model.model_validate(kw), context)
    onnx.checker.check_model(out)
    return out, context.notes


def mlp(seed: int = 0) -> onnx.ModelProto:
    """64 -> 128 -> 64 -> 10 with Gemm(transB) layers, as PyTorch exports nn.Linear."""
    rng = np.random.default_rng(seed)

    def f(name: str, shape: tuple[int, ...], std: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1),
    ]
    inits = [
        f("w1", (128, 64), np.sqrt(2 / 64)),
        f("b1", (128,), 0.01),
        f("w2", (64, 128), np.sqrt(2 / 128)),
        f("b2", (64,), 0.01),
        f("w3", (10, 64), np.sqrt(1 / 64)),
        f("b3", (10,), 0.01),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _digits_flat():
    x_tr, y_tr, x_te, y_te = corpus.load_digits_split(upsample=1)
    return x_tr.reshape(len(x_tr), 64), y_tr, x_te.reshape(len(x_te), 64), y_te


def test_qdq_export_reproduces_fake_quantization():
    model = mlp()
    x = np.abs(np.random.default_rng(1).normal(0, 1, (64, 64))).astype(np.float32)
    module = OnnxModule(model)
    plan = plan_quantization(model, ["Gemm"])
    assert set(plan.weights) == {"w1", "w2", "w3"}
    assert plan.activations == ["x", "r1", "r2"]  # after Relu, not before; logits stay float
    # The weight range this host's int8 kernels run without saturating (7-bit without VNNI):
    # with it, ONNX Runtime computes what the fake quantization trained, on any x86 level.
    host = host_profile()
    weight_max = choose_int8_encoding(None, weight_type="int8", target=None, host=host).weight_max
    fq = FakeQuantizedModule(module, plan, {"x": x}, weight_max=weight_max)
    qdq = export_qdq(model, fq)
    onnx.checker.check_model(qdq)
    assert int(np.abs(numpy_helper.to_array(
        next(t for t in qdq.graph.initializer if t.name == "w1__q"))).max()) == weight_max
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 3 + 3 + 3
    weights = {t.name: t for t in qdq.graph.initializer}
    assert weights["w1__q"].data_type == TensorProto.INT8
    assert list(weights["w1__scale"].dims) == [128]  # per output channel
    assert weights["b1__q"].data_type == TensorProto.INT32
    with torch.no_grad():
        fake = module({"x": torch.from_numpy(x)})["logits"].numpy()
    real = run_onnx(qdq, {"x": x})["logits"]
    # Equal up to the odd value landing on the other side of a rounding boundary (ONNX Runtime
    # divides by the scale with its own float kernel): one quantization step at most.
    np.testing.assert_allclose(real, fake, atol=0.02)
    assert np.abs(real - fake).mean() < 1e-3
    float_out = run_onnx(model, {"x": x})["logits"]
    assert np.abs(real - float_out).max() > 0  # it is really quantized


def test_needs_a_dataset(tmp_path):
    with pytest.raises(EngineError) as info:
        _run("quantize_aware_training", mlp(), tmp_path, {})
    assert info.value.code == "invalid_dataset"


def test_already_quantized_model_is_refused_precisely(tmp_path):
    x = np.abs(np.random.default_rng(1).normal(0, 1, (64, 64))).astype(np.float32)
    model = mlp()
    fq = FakeQuantizedModule(OnnxModule(model), plan_quantization(model, ["Gemm"]), {"x": x})
    qdq = export_qdq(model, fq)
    with pytest.raises(EngineError) as info:
        _run("quantize_aware_training", qdq, tmp_path, {"dataset": {"x": x}})
    assert info.value.code == "unsupported_op_for_training"
    assert info.value.details["op"] in {"QuantizeLinear", "DequantizeLinear"}


@pytest.fixture(scope="module")
def outlier_mlp(tmp_path_factory) -> onnx.ModelProto:
    """A digits MLP where static int8 loses accuracy.

    After training, the 4 most active hidden units of layer 1 are scaled up 300x and layer 2's
    matching inputs scaled down 300x: the float function is unchanged (ReLU is positively
    homogeneous), but one per-tensor activation scale must now cover a 300x wider range, as with
    the outlier features of real models.
    """
    x_tr, y_tr, _, _ = _digits_flat()
    model, _ = _run(
        "distill",
        mlp(),
        tmp_path_factory.mktemp("mlp"),
        {"dataset": {"x": x_tr}, "labels": y_tr, "original": mlp()},
        soft_weight=0.0,
        hard_weight=1.0,
        budget={"max_steps": 400, "lr": 3e-3},
    )
    active = run_onnx(model, {"x": x_tr}, ["r1"])["r1"].mean(0)
    scale = np.ones(128, np.float32)
    scale[np.argsort(-active)[:4]] = 300.0
    set_array(model, "w1", get_array(model, "w1") * scale[:, None])
    set_array(model, "b1", get_array(model, "b1") * scale)
    set_array(model, "w2", get_array(model, "w2") / scale[None, :])
    return model


@pytest.mark.slow
def test_qat_beats_static_int8_where_static_loses(outlier_mlp, tmp_path):
    x_tr, y_tr, x_te, y_te = _digits_flat()
    test = {"x": x_te}
    float_acc = accuracy(outlier_mlp, test, y_te)
    assert float_acc > 0.93
    static, _ = _run("quantize_static", outlier_mlp, tmp_path, {"dataset": {"x": x_tr[:128]}})
    static_acc = accuracy(static, test, y_te)
    qat, notes = _run(
        "quantize_aware_training",
        outlier_mlp,
        tmp_path,
        {"dataset": {"x": x_tr}, "labels": y_tr, "original": outlier_mlp},
        budget={"max_steps": 100, "lr": 1e-4, "max_seconds": 900},
    )
    qat_acc = accuracy(qat, test, y_te)
    assert static_acc < float_acc - 0.1  # the model where static int8 loses
    assert qat_acc > static_acc + 0.1  # QAT, same data, wins by a wide margin
    assert qat_acc > float_acc - 0.03
    assert notes["training"]["steps"] == 100
    assert qat.ByteSize() < outlier_mlp.ByteSize() / 2.5
