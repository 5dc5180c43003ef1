"""cluster_weights: indices + codebook really shrink the file, ONNX Runtime runs it, fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.passes.cluster_weights import kmeans_1d
from service.engine.registry import PassContext, get_pass
from service.engine.training.distillation import Teacher, accuracy, distill_model, run_onnx
from service.engine.training.settings import DistillationSettings, TrainingBudget
from tests import corpus


def _run(model: onnx.ModelProto, tmp: Path, **kw) -> tuple[onnx.ModelProto, dict]:
    cls = get_pass("cluster_weights")
    ctx = PassContext(workdir=tmp)
    out = cls().run(model, cls.config_model.model_validate(kw), ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, ctx.notes


def _rebuilt_weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The weights as ONNX Runtime rebuilds them (read back as extra outputs)."""
    return run_onnx(model, {"image": np.zeros((1, 1, 16, 16), np.float32)}, names)


def _without_exporter_traces(model: onnx.ModelProto) -> onnx.ModelProto:
    """The dynamo exporter stores a Python stack trace per node (~20 KB here): not model data.
    Stripped so that the ratio measures what clustering does to the weights' storage."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return out


def test_16_centroids_6x_smaller_and_runs(digits, kit, tmp_path):
    model = _without_exporter_traces(kit.load(digits))
    out, notes = _run(model, tmp_path, centroids=16)
    ratio = model.ByteSize() / out.ByteSize()
    assert ratio >= 6.0 and notes["size_ratio"] == pytest.approx(ratio, rel=0.01)
    packed = [t for t in out.graph.initializer if t.name.endswith("_packed")]
    assert packed and all(t.data_type == TensorProto.UINT8 for t in packed)
    rebuilt = _rebuilt_weights(out, list(notes["layers"]))
    for name, w in rebuilt.items():
        assert len(np.unique(w)) <= 16
        assert w.shape == tuple(next(t.dims for t in model.graph.initializer if t.name == name))
    # Fidelity: logits stay close, accuracy within a few points.
    ref = kit.outputs(model, digits.inputs)[0]
    got = kit.outputs(out, digits.inputs)[0]
    assert kit.min_cosine([ref], [got]) > 0.9
    assert accuracy(out, digits.inputs, digits.labels) > digits.info["test_accuracy"] - 0.08


def test_256_centroids_uint8_indices(digits, kit, tmp_path):
    model = _without_exporter_traces(kit.load(digits))
    out, notes = _run(model, tmp_path, centroids=256)
    assert model.ByteSize() / out.ByteSize() >= 3.5
    idx = [t for t in out.graph.initializer if t.name.endswith("_idx")]
    assert idx and all(t.data_type == TensorProto.UINT8 for t in idx)
    ref, got = kit.outputs(model, digits.inputs)[0], kit.outputs(out, digits.inputs)[0]
    assert kit.min_cosine([ref], [got]) > 0.99
    assert all(v["relative_error"] < 0.05 for v in notes["layers"].values())


def test_odd_sized_weight_rebuilds_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (7, 41)).astype(np.float32)  # 287 elements: odd, padded when packed
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 41])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, _ = _run(model, tmp_path, centroids=16, min_elements=16)
    centroids, idx = kmeans_1d(w, 16, 30)
    expected = centroids[idx].reshape(w.shape)
    eye = np.eye(7, dtype=np.float32)
    np.testing.assert_allclose(run_onnx(out, {"x": eye})["y"], expected, rtol=1e-6, atol=1e-6)


def test_kmeans_is_deterministic_and_uses_all_centroids():
    values = np.random.default_rng(3).normal(0, 1, 5000)
    c1, i1 = kmeans_1d(values, 16, 30)
    c2, i2 = kmeans_1d(values, 16, 30)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(i1, i2)
    assert len(np.unique(i1)) == 16 and (np.diff(c1) > 0).all()


@pytest.mark.slow
def test_distill_after_clustering_trains_codebooks_only(digits, kit, tmp_path):
    model = kit.load(digits)
    clustered, notes = _run(model, tmp_path, centroids=16)
    x_tr, y_tr, _, _ = corpus.load_digits_split()
    settings = DistillationSettings(budget=TrainingBudget(max_steps=60, lr=1e-3))
    tuned, _ = distill_model(clustered, [Teacher(model)], {"image": x_tr}, y_tr, settings)
    names = list(notes["layers"])
    before, after = _rebuilt_weights(clustered, names), _rebuilt_weights(tuned, names)
    assert any(not np.array_equal(before[n], after[n]) for n in names)
    assert all(len(np.unique(after[n])) <= 16 for n in names)
    assert tuned.ByteSize() == clustered.ByteSize()
    acc_c = accuracy(clustered, digits.inputs, digits.labels)
    assert accuracy(tuned, digits.inputs, digits.labels) >= acc_c - 0.01
