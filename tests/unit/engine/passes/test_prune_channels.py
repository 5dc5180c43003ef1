"""prune_channels: channels removed with the graph rewired; fewer FLOPs; recovery by distillation.

The proof of issue 8: the digits CNN pruned 50 % then distilled is within 1 point of the original
with >= 1.5x fewer FLOPs, and int8 static quantization still works on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.registry import PassContext, get_pass
from service.engine.training.distillation import accuracy, run_onnx
from service.engine.training.graph import count_macs
from tests import corpus


def _run(name: str, model: onnx.ModelProto, tmp: Path, **kw) -> tuple[onnx.ModelProto, dict]:
    data = kw.pop("ctx", {})
    cls = get_pass(name)
    ctx = PassContext(workdir=tmp, **data)
    out = cls().run(model, cls.config_model.model_validate(kw), ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, ctx.notes


def _f(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def _model(nodes, inits, in_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def dead_channel_model() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> Relu -> Flatten -> Gemm where half of each conv's output
    channels are exactly dead, so pruning them must not change the output at all."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (8, 3, 3, 3))
    b1 = rng.normal(0, 1, 8)
    w1[1::2], b1[1::2] = 0, 0
    mean, beta = rng.normal(0, 1, 8), rng.normal(0, 1, 8)
    mean[1::2], beta[1::2] = 0, 0  # a dead channel stays 0 through BN
    w2 = rng.normal(0, 1, (6, 8, 3, 3))
    b2 = rng.normal(0, 1, 6)
    w2[:3], b2[:3] = 0, 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[0, 0, 0, 0], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], transB=1),
    ]
    inits = [
        _f("w1", w1),
        _f("b1", b1),
        _f("g", rng.uniform(0.5, 2, 8)),
        _f("beta", beta),
        _f("mean", mean),
        _f("var", rng.uniform(0.5, 2, 8)),
        _f("w2", w2),
        _f("b2", b2),
        _f("w3", rng.normal(0, 1, (5, 6 * 3 * 3))),
        _f("b3", rng.normal(0, 1, 5)),
    ]
    return _model(nodes, inits, ["n", 3, 8, 8], ["n", 5])


def test_dead_channels_pruned_exactly_with_bn_and_flatten(tmp_path):
    model = dead_channel_model()
    out, notes = _run("prune_channels", model, tmp_path, ratio=0.5, min_channels=1)
    assert notes["channels"] == {"w1": {"before": 8, "after": 4}, "w2": {"before": 6, "after": 3}}
    dims = {t.name: list(t.dims) for t in out.graph.initializer}
    assert dims["w1"] == [4, 3, 3, 3] and dims["b1"] == [4]
    assert dims["g"] == dims["beta"] == dims["mean"] == dims["var"] == [4]
    assert dims["w2"] == [3, 4, 3, 3] and dims["w3"] == [5, 3 * 3 * 3]
    assert "model output" in notes["skipped"]["w3"]
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(out, {"x": x})["y"], run_onnx(model, {"x": x})["y"], rtol=1e-4, atol=1e-4
    )
    assert notes["macs_after"] < notes["macs_before"] / 2


def residual_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wa"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["cb", "ra"], ["res"]),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3"], ["y"], transB=1),
    ]
    inits = [
        _f("w0", rng.normal(0, 1, (8, 3, 3, 3))),
        _f("wa", rng.normal(0, 1, (6, 8, 3, 3))),
        _f("wb", rng.normal(0, 1, (6, 6, 3, 3))),
        _f("w3", rng.normal(0, 1, (4, 6))),
    ]
    return _model(nodes, inits, ["n", 3, 8, 8], ["n", 4])


def test_residual_tied_channels_are_skipped_and_the_rest_pruned(tmp_path):
    model = residual_model()
    out, notes = _run("prune_channels", model, tmp_path, ratio=0.5, min_channels=1)
    assert "residual" in notes["skipped"]["wa"] and "residual" in notes["skipped"]["wb"]
    assert notes["channels"]["w0"] == {"before": 8, "after": 4}
    dims = {t.name: list(t.dims) for t in out.graph.initializer}
    assert dims["wa"] == [6, 4, 3, 3] and dims["wb"] == [6, 6, 3, 3]
    x = np.zeros((2, 3, 8, 8), np.float32)
    assert run_onnx(out, {"x": x})["y"].shape == (2, 4)


def test_nothing_prunable_is_no_effect(tmp_path):
    with pytest.raises(EngineError) as info:
        _run("prune_channels", residual_model(), tmp_path, skip=["w0"])
    assert info.value.code == "no_effect" and "wa" in info.value.details["skipped"]


def test_digits_half_channels_fewer_flops_and_valid(digits, kit, tmp_path):
    model = kit.load(digits)
    out, notes = _run("prune_channels", model, tmp_path, ratio=0.5)
    assert notes["flops_reduction"] >= 1.5 * 2  # 50 % of channels in and out: ~4x
    assert count_macs(model) / count_macs(out) == pytest.approx(notes["flops_reduction"], rel=0.01)
    assert notes["params_after"] < 0.5 * notes["params_before"]
    assert kit.outputs(out, {"image": digits.inputs["image"][:3]})[0].shape == (3, 10)


@pytest.mark.slow
def test_prune_recover_quantize_digits(digits, kit, tmp_path):
    """Issue 8 proof: 50 % channels + distillation within 1 point, >= 1.5x fewer FLOPs; then int8."""
    model = kit.load(digits)
    x_tr, y_tr, x_te, y_te = corpus.load_digits_split()
    train = {"dataset": {"image": x_tr}, "labels": y_tr, "original": model}
    pruned, pnotes = _run("prune_channels", model, tmp_path, ratio=0.5)
    recovered, dnotes = _run(
        "distill",
        pruned,
        tmp_path,
        budget={"max_steps": 300, "lr": 2e-3, "max_seconds": 900},
        ctx=train,
    )
    base = accuracy(model, {"image": x_te}, y_te)
    acc_pruned = accuracy(pruned, {"image": x_te}, y_te)
    acc = accuracy(recovered, {"image": x_te}, y_te)
    assert acc_pruned < base - 0.1  # pruning alone hurts...
    assert acc >= base - 0.01  # ...distillation recovers to within 1 point
    assert count_macs(model) / count_macs(recovered) >= 1.5
    assert dnotes["training"]["steps"] == 300
    quantized, _ = _run(
        "quantize_static", recovered, tmp_path, ctx={"dataset": {"image": x_tr[:128]}}
    )
    assert accuracy(quantized, {"image": x_te}, y_te) >= base - 0.03
    assert quantized.ByteSize() < recovered.ByteSize() / 2.5


@pytest.mark.slow
def test_schedule_rounds_with_recovery(digits, kit, tmp_path):
    model = kit.load(digits)
    x_tr, y_tr, _, _ = corpus.load_digits_split()
    out, notes = _run(
        "prune_channels",
        model,
        tmp_path,
        schedule=[0.25, 0.5],
        recover=True,
        recovery={"budget": {"max_steps": 40}},
        ctx={"dataset": {"image": x_tr[:512]}, "labels": y_tr[:512], "original": model},
    )
    first, second = notes["rounds"]
    assert first["channels"]["2.weight"]["after"] == 48
    assert second["channels"]["2.weight"] == {"before": 48, "after": 32}
    for r in notes["rounds"]:
        assert r["accuracy_after_recovery"] > r["accuracy_after_prune"]


@pytest.mark.slow
def test_recipe_prune_recover_quantize_through_the_pipeline(digits, tmp_path):
    """Recipes compose: prune_channels -> distill -> quantize_static via compress."""
    from service.engine.compress import compress

    x_tr, y_tr, x_te, y_te = corpus.load_digits_split()
    data = tmp_path / "train.npz"
    np.savez(data, image=x_tr[:512], labels=y_tr[:512])
    recipe = [
        {"pass": "prune_channels", "ratio": 0.5},
        {"pass": "distill", "budget": {"max_steps": 100, "lr": 2e-3, "max_seconds": 600}},
        {"pass": "quantize_static"},
    ]
    result = compress(digits.path, recipe, tmp_path / "work", dataset_path=data)
    names = [p["pass"] for p in result.report["passes"]]
    assert names == ["prune_channels", "distill", "quantize_static"]
    notes = result.report["passes"][1]["notes"]
    assert notes["training"]["steps"] == 100 and notes["teachers"][0]["model"] == "original model"
    assert result.summary["size_ratio"] > 6
    # Accuracy on the held-out test split (360 digits never trained or calibrated on), not on
    # the 16 training samples the job evaluates: one sample there is 6 points.
    import onnxruntime as ort

    def test_accuracy(path: object) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {name: x_te[i:i + 1]})[0]
                                 for i in range(len(x_te))])
        return float((logits.argmax(axis=1) == y_te).mean())

    before, after = test_accuracy(digits.path), test_accuracy(result.model_path)
    assert after > before - 0.03, (before, after)
