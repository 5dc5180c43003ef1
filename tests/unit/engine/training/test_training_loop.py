"""The shared training loop and the distillation objective on a small MLP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.training.bridge import OnnxModule
from service.engine.training.distillation import (
    Teacher,
    check_compatible,
    check_dataset,
    distill_into,
    distill_model,
    run_onnx,
    sparsity_masks,
)
from service.engine.training.loop import train
from service.engine.training.settings import DistillationSettings, FeaturePair, TrainingBudget


def mlp(seed: int, hidden: int = 16, classes: int = 4, features: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, classes)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(0, 1, (128, 8)).astype(np.float32)}


def test_distillation_moves_student_to_teacher(data):
    teacher, student = mlp(0), mlp(1)
    settings = DistillationSettings(budget=TrainingBudget(max_steps=150, lr=1e-2, batch_size=32))
    messages: list[str] = []
    trained, notes = distill_model(
        student,
        [Teacher(teacher)],
        data,
        None,
        settings,
        progress=lambda f, m: messages.append(m),
    )
    t = run_onnx(teacher, data)["logits"].argmax(1)
    before = (run_onnx(student, data)["logits"].argmax(1) == t).mean()
    after = (run_onnx(trained, data)["logits"].argmax(1) == t).mean()
    assert after > before + 0.2 and after > 0.7
    assert notes["training"]["steps"] == 150 and notes["training"]["stopped_by"] == "steps"
    assert notes["training"]["final_loss"] < notes["training"]["first_loss"]
    assert messages and all("epoch" in m and "loss" in m for m in messages)


def test_same_seed_same_weights(data):
    results = []
    for _ in range(2):
        trained, _ = distill_model(
            mlp(1),
            [Teacher(mlp(0))],
            data,
            None,
            DistillationSettings(budget=TrainingBudget(max_steps=20, seed=7)),
        )
        results.append(numpy_helper.to_array(trained.graph.initializer[0]))
    np.testing.assert_array_equal(results[0], results[1])


def test_time_budget_stops_training(data):
    module = OnnxModule(mlp(0))
    result = train(
        module,
        data,
        lambda out, idx: out["logits"].pow(2).mean(),
        TrainingBudget(max_steps=100_000, max_seconds=0.3),
    )
    assert result.stopped_by == "time" and 0 < result.steps < 100_000


def test_cancellation_stops_between_steps(data):
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise EngineError("cancelled", "job cancelled")

    module = OnnxModule(mlp(0))
    with pytest.raises(EngineError) as info:
        train(
            module,
            data,
            lambda out, idx: out["logits"].pow(2).mean(),
            TrainingBudget(max_steps=50),
            check_cancelled=check,
        )
    assert info.value.code == "cancelled" and calls["n"] == 4


def test_hard_labels_and_multi_teacher_weights(data):
    labels = np.random.default_rng(2).integers(0, 4, 128)
    student = OnnxModule(mlp(3))
    # Weighted teachers: all the weight on teacher B means the student learns B.
    a, b = mlp(10), mlp(11)
    settings = DistillationSettings(
        hard_weight=0.0, budget=TrainingBudget(max_steps=150, lr=1e-2, batch_size=32)
    )
    distill_into(student, [Teacher(a, 1e-6), Teacher(b, 1.0)], data, labels, settings)
    out = student.write_back()
    pred = run_onnx(out, data)["logits"].argmax(1)
    agree_b = (pred == run_onnx(b, data)["logits"].argmax(1)).mean()
    agree_a = (pred == run_onnx(a, data)["logits"].argmax(1)).mean()
    assert agree_b > agree_a + 0.2
    # Labels only (no teacher term) fits the labels.
    student2 = OnnxModule(mlp(3))
    distill_into(
        student2,
        [Teacher(a)],
        data,
        labels,
        DistillationSettings(
            soft_weight=0.0,
            hard_weight=1.0,
            budget=TrainingBudget(max_steps=300, lr=1e-2, batch_size=32),
        ),
    )
    fit = (run_onnx(student2.write_back(), data)["logits"].argmax(1) == labels).mean()
    assert fit > 0.5  # random labels: chance is 0.25


def test_feature_matching_pulls_hidden_layer(data):
    teacher, student = mlp(0), mlp(1)
    settings = DistillationSettings(
        soft_weight=0.0,
        features=[FeaturePair(student="hidden", teacher="hidden")],
        budget=TrainingBudget(max_steps=150, lr=1e-2, batch_size=32),
    )
    trained, _ = distill_model(student, [Teacher(teacher)], data, None, settings)
    ref = run_onnx(teacher, data, ["hidden"])["hidden"]
    err_before = np.abs(run_onnx(student, data, ["hidden"])["hidden"] - ref).mean()
    err_after = np.abs(run_onnx(trained, data, ["hidden"])["hidden"] - ref).mean()
    assert err_after < 0.5 * err_before


def test_pruned_zeros_stay_zero(data):
    student = mlp(1)
    w1 = numpy_helper.to_array(student.graph.initializer[0]).copy()
    w1[:, ::2] = 0.0
    student.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    module = OnnxModule(student)
    assert set(sparsity_masks(module)) == {"w1"}
    distill_into(
        module,
        [Teacher(mlp(0))],
        data,
        None,
        DistillationSettings(budget=TrainingBudget(max_steps=30, lr=1e-2)),
    )
    after = module.parameter("w1").detach().numpy()
    assert (after[:, ::2] == 0).all() and (after[:, 1::2] != 0).mean() > 0.9


def test_dataset_errors_are_precise(data):
    model = mlp(0)
    with pytest.raises(EngineError, match="upload a dataset") as info:
        check_dataset(model, None, 32, "distill")
    assert info.value.code == "invalid_dataset"
    with pytest.raises(EngineError, match="at least 32 samples, the dataset has 10"):
        check_dataset(model, {"x": data["x"][:10]}, 32, "distill")
    with pytest.raises(EngineError, match="size 5 on axis 1, the model input needs 8"):
        check_dataset(model, {"x": np.zeros((64, 5), np.float32)}, 32, "distill")
    with pytest.raises(EngineError, match="no array for model input 'x'"):
        check_dataset(model, {"image": np.zeros((64, 8), np.float32)}, 32, "distill")
    with pytest.raises(EngineError, match="3 dimensions"):
        check_dataset(model, {"x": np.zeros((64, 8, 1), np.float32)}, 32, "distill")


def test_student_teacher_mismatch_is_precise(data):
    with pytest.raises(EngineError) as info:
        check_compatible(mlp(0, classes=3), mlp(1, classes=4), {"x": data["x"][:2]}, "teacher")
    assert info.value.code == "incompatible_student"
    assert "per-sample shape [3]" in info.value.message and "[4]" in info.value.message


def test_feature_shape_mismatch_is_precise(data):
    settings = DistillationSettings(
        features=[FeaturePair(student="hidden", teacher="hidden")],
        budget=TrainingBudget(max_steps=2),
    )
    with pytest.raises(EngineError) as info:
        distill_model(mlp(1, hidden=12), [Teacher(mlp(0, hidden=16))], data, None, settings)
    assert info.value.code == "incompatible_student" and "'hidden'" in info.value.message


def test_train_requires_grad_flow(data):
    # Sanity: the loss really depends on the parameters (no detached path in the bridge).
    module = OnnxModule(mlp(0))
    before = module.parameter("w2").detach().clone()
    train(
        module,
        data,
        lambda out, idx: out["logits"].pow(2).mean(),
        TrainingBudget(max_steps=5, lr=1e-2),
    )
    assert not torch.equal(before, module.parameter("w2").detach())
