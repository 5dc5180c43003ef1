"""prune_magnitude: sparsity reached per layer, sensitive layers kept, real zstd saving with int8,
iterative schedule with distillation recovery reporting accuracy per round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.engine.errors import EngineError
from service.engine.registry import PassContext, get_pass, parse_recipe
from service.engine.training.distillation import accuracy
from service.engine.training.graph import serialized_sizes
from tests import corpus


def _run(name: str, model: onnx.ModelProto, tmp: Path, **kw) -> tuple[onnx.ModelProto, dict]:
    data = kw.pop("ctx", {})
    cls = get_pass(name)
    ctx = PassContext(workdir=tmp, **data)
    out = cls().run(model, cls.config_model.model_validate(kw), ctx)
    onnx.checker.check_model(out)
    return out, ctx.notes


def _zeros(model: onnx.ModelProto, name: str) -> float:
    t = next(t for t in model.graph.initializer if t.name == name)
    return float((numpy_helper.to_array(t) == 0).mean())


def test_per_layer_sparsity_and_first_last_kept(digits, kit, tmp_path):
    model = kit.load(digits)
    out, notes = _run("prune_magnitude", model, tmp_path, sparsity=0.8)
    assert notes["skipped"] and set(notes["skipped"].values()) == {"first layer", "last layer"}
    for name, sparsity in notes["sparsity_per_layer"].items():
        assert sparsity == pytest.approx(0.8, abs=0.01)
        assert _zeros(out, name) == pytest.approx(0.8, abs=0.01)
    for name in notes["skipped"]:
        assert _zeros(out, name) < 0.05
    # Dense storage: same raw size, much smaller compressed.
    assert notes["bytes_after"] == notes["bytes_before"]
    assert notes["bytes_zstd_after"] < 0.5 * notes["bytes_zstd_before"]
    assert kit.outputs(out, {"image": digits.inputs["image"][:4]})[0].shape == (4, 10)


def test_global_scope_reaches_target_overall(digits, kit, tmp_path):
    model = kit.load(digits)
    out, notes = _run("prune_magnitude", model, tmp_path, sparsity=0.6, scope="global")
    assert notes["sparsity_pruned_layers"] == pytest.approx(0.6, abs=0.01)
    per_layer = notes["sparsity_per_layer"].values()
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold: layers differ


def test_80_percent_plus_int8_zstd_is_8x_smaller(digits, kit, tmp_path):
    model = kit.load(digits)
    pruned, _ = _run("prune_magnitude", model, tmp_path, sparsity=0.8)
    calib = {"dataset": {"image": digits.calibration["image"]}}
    quantized, _ = _run("quantize_static", pruned, tmp_path, ctx=calib)
    float_bytes = serialized_sizes(model)["bytes"]
    sizes = serialized_sizes(quantized)
    assert float_bytes / sizes["bytes_zstd"] >= 8.0
    # int8 alone (dense) does not get there: the sparsity is what the compressor exploits.
    dense_q, _ = _run("quantize_static", model, tmp_path, ctx=calib)
    assert serialized_sizes(dense_q)["bytes_zstd"] > 1.5 * sizes["bytes_zstd"]


@pytest.mark.slow
def test_schedule_with_recovery_reports_accuracy_per_round(digits, kit, tmp_path):
    x_tr, y_tr, _, _ = corpus.load_digits_split()
    model = kit.load(digits)
    out, notes = _run(
        "prune_magnitude",
        model,
        tmp_path,
        schedule=[0.5, 0.9],
        recover=True,
        recovery={"budget": {"max_steps": 40, "batch_size": 64, "lr": 1e-3}},
        ctx={"dataset": {"image": x_tr[:512]}, "labels": y_tr[:512], "original": model},
    )
    rounds = notes["rounds"]
    assert [r["target"] for r in rounds] == [0.5, 0.9]
    for r in rounds:
        assert {"accuracy_after_prune", "accuracy_after_recovery", "recovery"} <= set(r)
    # 90 % hurts; distillation recovers part of it while the zeros stay zeros.
    assert rounds[1]["accuracy_after_recovery"] > rounds[1]["accuracy_after_prune"]
    assert notes["sparsity_pruned_layers"] == pytest.approx(0.9, abs=0.01)


def test_recovery_without_dataset_fails_precisely(digits, kit, tmp_path):
    with pytest.raises(EngineError) as info:
        _run("prune_magnitude", kit.load(digits), tmp_path, schedule=[0.3, 0.6], recover=True)
    assert info.value.code == "invalid_dataset"


def test_bad_schedules_are_refused_by_the_recipe_parser():
    for schedule in ([0.5, 0.3], [0.2, 1.5], []):
        with pytest.raises(EngineError) as info:
            parse_recipe([{"pass": "prune_magnitude", "schedule": schedule}])
        assert info.value.code == "invalid_recipe"


def test_nothing_to_prune_is_no_effect(digits, kit, tmp_path):
    with pytest.raises(EngineError) as info:
        _run("prune_magnitude", kit.load(digits), tmp_path, op_types=["MatMul"])
    assert info.value.code == "no_effect"


def test_accuracy_helper_sanity(digits, kit):
    model = kit.load(digits)
    acc = accuracy(model, digits.inputs, digits.labels)
    assert acc == pytest.approx(digits.info["test_accuracy"], abs=0.01)
    assert np.isfinite(acc)
