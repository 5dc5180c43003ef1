"""prune_2_4: the 2:4 pattern holds on every pruned weight, along the input dimension."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.passes.prune_2_4 import prune_2_4_array, satisfies_2_4
from service.engine.registry import PassContext, get_pass
from service.engine.training.distillation import run_onnx


def _run(model: onnx.ModelProto, tmp: Path, **kw) -> tuple[onnx.ModelProto, dict]:
    data = kw.pop("ctx", {})
    cls = get_pass("prune_2_4")
    ctx = PassContext(workdir=tmp, **data)
    out = cls().run(model, cls.config_model.model_validate(kw), ctx)
    onnx.checker.check_model(out)
    return out, ctx.notes


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_pattern_on_every_pruned_conv_weight(digits, kit, tmp_path):
    model = kit.load(digits)
    out, notes = _run(model, tmp_path)
    assert notes["verified"] is True and "Ampere" in notes["acceleration"]
    assert notes["sparsity_per_layer"]
    for name, sparsity in notes["sparsity_per_layer"].items():
        w = _array(out, name)
        assert sparsity == pytest.approx(0.5, abs=0.01)
        # Independent check: along the input channels (axis 1), every 4-group has <= 2 non-zeros.
        groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all()
        # Kept entries are the larger ones of their group.
        orig = np.moveaxis(_array(model, name), 1, -1).reshape(-1, 4)
        kept = np.where(groups != 0, np.abs(orig), np.inf).min(1)
        dropped = np.where(groups == 0, np.abs(orig), -np.inf).max(1)
        assert (kept >= dropped).all()
    assert kit.outputs(out, {"image": digits.inputs["image"][:2]})[0].shape == (2, 10)


def _matmul_model(k: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 1, (k, 12)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 1, (12, 8)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.normal(0, 1, (8, 3)).astype(np.float32), "w3")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["b"]),
        helper.make_node("Gemm", ["b", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [w1, w2, w3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_weights_pruned_along_k(tmp_path):
    out, notes = _run(_matmul_model(16), tmp_path, skip_first_last=False, min_elements=1)
    assert set(notes["sparsity_per_layer"]) == {"w1", "w2", "w3"}
    for name in ("w1", "w2", "w3"):
        w = _array(out, name)  # [K, N]: groups run down the K axis
        assert ((w.T.reshape(-1, 4) != 0).sum(1) <= 2).all()
    x = np.ones((2, 16), np.float32)
    assert run_onnx(out, {"x": x})["y"].shape == (2, 3)


def test_layers_with_input_dim_not_multiple_of_4_are_skipped_and_named(tmp_path):
    out, notes = _run(_matmul_model(10), tmp_path, skip_first_last=False, min_elements=1)
    assert "not a multiple of 4" in notes["skipped"]["w1"]
    assert (_array(out, "w1") != 0).all()


def test_verifier_detects_a_broken_pattern():
    w = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    pruned = prune_2_4_array(w, axis=1)
    assert satisfies_2_4(pruned, 1)
    assert not satisfies_2_4(w, 1)
    broken = pruned.copy()
    broken[0, 0] = 5.0  # three non-zeros in the first group
    assert not satisfies_2_4(broken, 1)


def test_nothing_prunable_is_no_effect(tmp_path):
    with pytest.raises(EngineError) as info:
        # w1 (K = 10) cannot hold the pattern, w2 is skipped by name, w3 is the last layer.
        _run(_matmul_model(10), tmp_path, min_elements=1, skip=["w2"])
    assert info.value.code == "no_effect"
