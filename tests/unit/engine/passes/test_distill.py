"""distill: uploaded students and extra teachers by model id, precise failures, and the proof that
distillation beats training the same student on labels alone (same data, same step budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.errors import EngineError
from service.engine.registry import PassContext, get_pass
from service.engine.training.distillation import accuracy
from tests import corpus


def _run(model: onnx.ModelProto, tmp: Path, ctx: dict, **kw) -> tuple[onnx.ModelProto, dict]:
    cls = get_pass("distill")
    context = PassContext(workdir=tmp, **ctx)
    out = cls().run(model, cls.config_model.model_validate(kw), context)
    onnx.checker.check_model(out)
    return out, context.notes


def small_student(classes: int = 10, seed: int = 0, op: str = "Gemm") -> onnx.ModelProto:
    """Conv(1->8, stride 2) -> Relu -> Flatten -> Gemm: ~9x fewer weights than the digits CNN."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, np.sqrt(2 / 9), (8, 1, 3, 3)).astype(np.float32)
    fc_w = rng.normal(0, np.sqrt(1 / 512), (512, classes)).astype(np.float32)
    head = (
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"])
        if op == "Gemm"
        else helper.make_node("Einsum", ["flat", "fc_w"], ["logits"], equation="ni,ij->nj")
    )
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["flat"], axis=1),
        head,
    ]
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "conv_b"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
    ]
    if op != "Gemm":
        inits.pop()
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def uploads(tmp_path: Path):
    """A model-id resolver over files written by the test (what the worker hands the engine)."""
    store: dict[str, Path] = {}

    def add(model_id: str, model: onnx.ModelProto) -> str:
        path = tmp_path / f"{model_id}.onnx"
        onnx.save(model, str(path))
        store[model_id] = path
        return model_id

    def resolve(model_id: str) -> Path:
        return store[model_id]  # KeyError for an unknown id, as a store would

    return add, resolve


def _ctx(model, resolve, n=256, labels=True):
    x_tr, y_tr, _, _ = corpus.load_digits_split()
    return {
        "dataset": {"image": x_tr[:n]},
        "labels": y_tr[:n] if labels else None,
        "original": model,
        "resolve_model": resolve,
    }


def test_uploaded_student_and_extra_teacher(digits, kit, uploads, tmp_path):
    add, resolve = uploads
    model = kit.load(digits)
    add("student", small_student())
    add("teacher2", small_student(seed=5))
    messages: list[str] = []
    ctx = _ctx(model, resolve)
    ctx["progress"] = lambda f, m: messages.append(m)
    out, notes = _run(
        model,
        tmp_path,
        ctx,
        student_model_id="student",
        teachers=[{"model_id": "teacher2", "weight": 0.25}],
        budget={"max_steps": 30, "lr": 3e-3},
    )
    assert [t["weight"] for t in notes["teachers"]] == [1.0, 0.25]
    assert notes["student"] == "student" and notes["training"]["steps"] == 30
    assert {n.op_type for n in out.graph.node} == {"Conv", "Relu", "Flatten", "Gemm"}
    assert out.ByteSize() < model.ByteSize() / 5
    assert notes["accuracy_after"] > notes["accuracy_before"]
    assert any("epoch" in m and "loss" in m for m in messages)


def test_student_with_other_outputs_fails_precisely(digits, kit, uploads, tmp_path):
    add, resolve = uploads
    add("five_classes", small_student(classes=5))
    with pytest.raises(EngineError) as info:
        _run(
            kit.load(digits),
            tmp_path,
            _ctx(kit.load(digits), resolve),
            student_model_id="five_classes",
        )
    assert info.value.code == "incompatible_student"
    assert "[5]" in info.value.message and "[10]" in info.value.message


def test_student_with_an_op_training_cannot_run(digits, kit, uploads, tmp_path):
    add, resolve = uploads
    add("einsum", small_student(op="Einsum"))
    with pytest.raises(EngineError) as info:
        _run(kit.load(digits), tmp_path, _ctx(kit.load(digits), resolve), student_model_id="einsum")
    assert info.value.code == "unsupported_op_for_training"
    assert info.value.details["op"] == "Einsum"


@pytest.mark.parametrize(
    "dataset,needle",
    [
        (None, "upload a dataset"),
        ({"image": np.zeros((8, 1, 16, 16), np.float32)}, "at least 32 samples, the dataset has 8"),
        (
            {"image": np.zeros((64, 1, 8, 8), np.float32)},
            "size 8 on axis 2, the model input needs 16",
        ),
        ({"pixels": np.zeros((64, 1, 16, 16), np.float32)}, "no array for model input 'image'"),
    ],
)
def test_bad_datasets_fail_precisely(digits, kit, tmp_path, dataset, needle):
    model = kit.load(digits)
    with pytest.raises(EngineError) as info:
        _run(model, tmp_path, {"dataset": dataset, "original": model})
    assert info.value.code == "invalid_dataset" and needle in info.value.message


def test_unknown_or_unresolvable_student_ids(digits, kit, uploads, tmp_path):
    _, resolve = uploads
    model = kit.load(digits)
    with pytest.raises(EngineError) as info:
        _run(model, tmp_path, _ctx(model, resolve), student_model_id="nope")
    assert info.value.code == "invalid_recipe" and "'nope' does not exist" in info.value.message
    with pytest.raises(EngineError) as info:
        _run(model, tmp_path, _ctx(model, None), teachers=[{"model_id": "t"}])
    assert info.value.code == "invalid_recipe"


@pytest.fixture(scope="module")
def strong_teacher(digits, tmp_path_factory) -> onnx.ModelProto:
    """The corpus CNN trained a little further on all training labels (a ~98 % teacher)."""
    from service.engine.normalise import normalise

    model = normalise(onnx.load(str(digits.path)))[0]
    x_tr, y_tr, _, _ = corpus.load_digits_split()
    out, _ = _run(
        model,
        tmp_path_factory.mktemp("teacher"),
        {"dataset": {"image": x_tr}, "labels": y_tr, "original": model},
        soft_weight=0.0,
        hard_weight=1.0,
        budget={"max_steps": 150, "lr": 2e-3},
    )
    return out


@pytest.mark.slow
def test_distillation_beats_labels_alone(strong_teacher, uploads, tmp_path):
    """Same student, same 150 labelled samples, same 200 steps: teacher's soft targets win."""
    add, resolve = uploads
    add("student", small_student())
    _, _, x_te, y_te = corpus.load_digits_split()
    ctx = _ctx(strong_teacher, resolve, n=150)
    budget = {"max_steps": 200, "lr": 3e-3, "batch_size": 64, "max_seconds": 900}
    kd, kd_notes = _run(strong_teacher, tmp_path, ctx, student_model_id="student", budget=budget)
    labels_only, _ = _run(
        strong_teacher,
        tmp_path,
        ctx,
        student_model_id="student",
        budget=budget,
        soft_weight=0.0,
        hard_weight=1.0,
    )
    acc_kd = accuracy(kd, {"image": x_te}, y_te)
    acc_labels = accuracy(labels_only, {"image": x_te}, y_te)
    assert accuracy(strong_teacher, {"image": x_te}, y_te) > 0.95
    assert acc_kd > acc_labels, (acc_kd, acc_labels)
    assert kd_notes["training"]["steps"] == 200
