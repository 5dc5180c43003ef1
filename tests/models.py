"""Small models crafted with onnx.helper for the service tests (no training needed, except
``digits_mlp``: a few seconds of scikit-learn training, for tests that need real accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(inputs: int = 256, hidden: int = 512, outputs: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x[N, inputs] -> MatMul -> Add -> Relu -> MatMul -> Add -> y[N, outputs]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)).astype(np.float32)
    b2 = np.zeros(outputs, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_mlp(path: Path, **kwargs: int) -> Path:
    onnx.save(mlp(**kwargs), path)
    return path


def digits_mlp(hidden: int = 128) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A trained classifier: scikit-learn's digits (upsampled to 16x16 = 256 features in [0, 1])
    -> MatMul/Add/Relu x2 -> MatMul/Add -> Softmax ``probs`` [N, 10], from a scikit-learn MLP
    (about two seconds of training, deterministic).

    Returns (model, x_calibration, x_heldout): the training rows, and the disjoint test rows.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from tests.corpus import load_digits_split

    x_tr, y_tr, x_te, _ = load_digits_split(upsample=2)
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    clf = MLPClassifier((hidden, hidden), max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_tr, y_tr)
    arrays, nodes, x = [], [], "x"
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        arrays += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                   numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias")]
        x = f"a{i}"
        if i < len(clf.coefs_) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], arrays)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, x_tr.astype(np.float32), x_te.astype(np.float32)
