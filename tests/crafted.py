"""Edge-case ONNX models crafted with ``onnx.helper``: what real exports look like, and hostile input.

Each builder is deterministic (fixed seeds) and cheap. Models are returned as ``ModelProto``;
builders of files (external data, archives, hostile uploads) write into a directory and return
the path. Nothing here loads a pickle: the pickle-shaped files are written as bytes only.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return h.make_node("Constant", [], [name], value=nh.from_array(arr, name + "_value"),
                       name=name + "_const")


def _model(graph: onnx.GraphProto, opset: int = 17, ir: int = 8,
           extra: list[onnx.OperatorSetIdProto] | None = None) -> onnx.ModelProto:
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), *(extra or [])],
                     ir_version=ir, producer_name="edgepress-tests")
    return m


# ---------------------------------------------------------------------------------------------
# Shapes of real exports


def constant_weights_opset11() -> onnx.ModelProto:
    """Opset 11, IR 6: conv and matmul weights held in ``Constant`` nodes (old exporters).

    x[N,1,8,8] -> Conv(8 filters) -> Relu -> Flatten -> MatMul(Transpose(W)) -> Add -> logits[N,64].
    The MatMul weight is stored transposed behind a ``Transpose`` of a constant (folded by
    normalisation). Weights dominate (~100k floats).
    """
    rng = _rng()
    nodes = [
        _const("conv_w", _w(rng, 8, 1, 3, 3)),
        _const("conv_b", _w(rng, 8)),
        h.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        _const("fc_wt", _w(rng, 192, 512)),  # stored as [out, in]
        h.make_node("Transpose", ["fc_wt"], ["fc_w"], name="fc_transpose", perm=[1, 0]),
        h.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
        _const("fc_b", _w(rng, 192)),
        h.make_node("Add", ["m", "fc_b"], ["h1"], name="fc_bias"),
        h.make_node("Relu", ["h1"], ["h2"], name="relu2"),
        _const("out_w", _w(rng, 192, 64)),
        h.make_node("MatMul", ["h2", "out_w"], ["logits"], name="out"),
    ]
    g = h.make_graph(nodes, "constant_weights",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 8, 8])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["N", 64])])
    return _model(g, opset=11, ir=6)


def if_branch_weights() -> onnx.ModelProto:
    """Weights inside ``If`` branches: a Constant node in ``then``, an initializer in ``else``.

    x[N,64] -> If(sum(x) > 0) then MatMul(x, W1) else MatMul(x, W2) -> Relu -> y[N,256].
    """
    rng = _rng()
    w1, w2 = _w(rng, 64, 256), _w(rng, 64, 256)
    then_g = h.make_graph(
        [_const("w_then", w1), h.make_node("MatMul", ["x", "w_then"], ["y_then"], name="mm_then")],
        "then_branch", [], [h.make_tensor_value_info("y_then", T.FLOAT, ["N", 256])])
    else_g = h.make_graph(
        [h.make_node("MatMul", ["x", "w_else"], ["y_else"], name="mm_else")],
        "else_branch", [], [h.make_tensor_value_info("y_else", T.FLOAT, ["N", 256])],
        initializer=[nh.from_array(w2, "w_else")])
    nodes = [
        h.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        h.make_node("If", ["cond"], ["yb"], name="branch", then_branch=then_g,
                    else_branch=else_g),
        h.make_node("Relu", ["yb"], ["y"], name="relu"),
    ]
    g = h.make_graph(nodes, "if_weights", [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 256])],
                     initializer=[nh.from_array(np.zeros((), np.float32), "zero")])
    return _model(g, opset=13, ir=7)


def loop_body_weights(steps: int = 3) -> onnx.ModelProto:
    """A ``Loop`` whose body applies a weight held in a Constant node: h <- tanh(h @ W), 3 times.

    x[N,128] -> Loop(3) -> y[N,128]; W (128x128) lives only inside the body.
    """
    rng = _rng()
    body = h.make_graph(
        [_const("w_loop", _w(rng, 128, 128)),
         h.make_node("MatMul", ["h_in", "w_loop"], ["m"], name="mm_loop"),
         h.make_node("Tanh", ["m"], ["h_out"], name="tanh_loop"),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_pass")],
        "loop_body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("h_in", T.FLOAT, ["N", 128])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("h_out", T.FLOAT, ["N", 128])])
    g = h.make_graph(
        [h.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="loop", body=body)],
        "loop_weights", [h.make_tensor_value_info("x", T.FLOAT, ["N", 128])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 128])],
        [nh.from_array(np.array(steps, np.int64), "trips"),
         nh.from_array(np.array(True), "keep_going")])
    return _model(g, opset=17)


def dynamic_dims() -> onnx.ModelProto:
    """Token ids[batch, seq] -> Gather(embedding) -> MatMul -> Gelu-ish -> MatMul -> y[batch,seq,64].

    Both dims symbolic; the embedding rows bound what valid generated ids are.
    """
    rng = _rng()
    emb, w1, b1, w2 = _w(rng, 100, 64), _w(rng, 64, 1024), _w(rng, 1024), _w(rng, 1024, 64)
    nodes = [
        h.make_node("Gather", ["emb", "ids"], ["e"], name="embed", axis=0),
        h.make_node("MatMul", ["e", "w1"], ["m1"], name="ff1"),
        h.make_node("Add", ["m1", "b1"], ["a1"], name="ff1_bias"),
        h.make_node("Relu", ["a1"], ["r1"], name="act"),
        h.make_node("MatMul", ["r1", "w2"], ["y"], name="ff2"),
    ]
    g = h.make_graph(nodes, "dynamic_dims",
                     [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 64])],
                     initializer=[nh.from_array(a, n) for a, n in
                                  ((emb, "emb"), (w1, "w1"), (b1, "b1"), (w2, "w2"))])
    return _model(g, opset=17)


def mlp(in_features: int = 64, hidden: int = 512, classes: int = 10) -> onnx.ModelProto:
    """A plain float MLP classifier, weights as initializers: x[N,in] -> logits[N,classes]."""
    rng = _rng()
    inits = [nh.from_array(_w(rng, in_features, hidden), "w1"),
             nh.from_array(_w(rng, hidden), "b1"),
             nh.from_array(_w(rng, hidden, hidden), "w2"),
             nh.from_array(_w(rng, hidden), "b2"),
             nh.from_array(_w(rng, hidden, classes), "w3")]
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        h.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        h.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        h.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        h.make_node("Add", ["m2", "b2"], ["a2"], name="fc2_bias"),
        h.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        h.make_node("MatMul", ["r2", "w3"], ["logits"], name="fc3"),
    ]
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["N", in_features])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["N", classes])], inits)
    return _model(g, opset=17)


def already_quantized_qdq() -> onnx.ModelProto:
    """QDQ int8: activations through Quantize/DequantizeLinear, int8 weight dequantized."""
    rng = _rng()
    wq = rng.integers(-127, 127, size=(64, 128), dtype=np.int8)
    inits = [nh.from_array(wq, "w_q"), nh.from_array(np.array(0.01, np.float32), "w_scale"),
             nh.from_array(np.array(0, np.int8), "w_zp"), nh.from_array(np.array(0.05, np.float32), "x_scale"),
             nh.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
        h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w"),
        h.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
    ]
    g = h.make_graph(nodes, "qdq", [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 128])], inits)
    return _model(g, opset=17)


def already_quantized_nbits() -> onnx.ModelProto:
    """MatMulNBits (4-bit, com.microsoft) as written by int4 weight-only quantizers."""
    rng = _rng()
    k, n, block = 64, 128, 32
    b = rng.integers(0, 255, size=(n, k // block, block // 2), dtype=np.uint8)
    scales = np.full((n * (k // block),), 0.01, np.float32)
    node = h.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], name="mm4", domain="com.microsoft",
                       K=k, N=n, bits=4, block_size=block)
    g = h.make_graph([node], "nbits", [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", n])],
                     [nh.from_array(b, "B"), nh.from_array(scales, "scales")])
    return _model(g, opset=17, extra=[h.make_opsetid("com.microsoft", 1)])


def already_quantized_int8_initializers() -> onnx.ModelProto:
    """Integer ops: MatMulInteger on a uint8 activation with an int8 weight initializer."""
    rng = _rng()
    w = rng.integers(-127, 127, size=(64, 32), dtype=np.int8)
    node = h.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")
    g = h.make_graph([node], "int8", [h.make_tensor_value_info("x", T.INT8, ["N", 64])],
                     [h.make_tensor_value_info("y", T.INT32, ["N", 32])],
                     [nh.from_array(w, "w")])
    return _model(g, opset=17)


# ---------------------------------------------------------------------------------------------
# External data and archives


def write_external_data_model(directory: Path, name: str = "model.onnx") -> Path:
    """Save ``mlp()`` as ``name`` plus ``name.data`` (all weights external) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    m = mlp()
    path = directory / name
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    return path


def build_archive(files: dict[str, bytes | Path], dest: Path, kind: str = "zip") -> Path:
    """Pack ``{member name: bytes or file}`` into a zip or tar at ``dest`` (names used verbatim)."""
    if kind == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for member, content in files.items():
                zf.writestr(member, content.read_bytes() if isinstance(content, Path) else content)
    else:
        with tarfile.open(dest, "w") as tf:
            for member, content in files.items():
                data = content.read_bytes() if isinstance(content, Path) else content
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return dest


def external_data_archive(directory: Path, kind: str = "zip") -> Path:
    """An archive holding ``model.onnx`` and ``model.onnx.data`` (weights external)."""
    src = write_external_data_model(directory / "src")
    return build_archive({"model/model.onnx": src,
                          "model/model.onnx.data": src.with_name("model.onnx.data")},
                         directory / f"model.{kind}", kind)


# ---------------------------------------------------------------------------------------------
# Hostile uploads: each returns (path, expected error code)


def _tiny_graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None,
                x_shape: list | None = None, y_shape: list | None = None) -> onnx.GraphProto:
    return h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape or ["N", 4])],
                        [h.make_tensor_value_info("y", T.FLOAT, y_shape or ["N", 4])],
                        inits or [])


def _relu_model() -> onnx.ModelProto:
    return _model(_tiny_graph([h.make_node("Relu", ["x"], ["y"], name="relu")]))


def _external_model(location: str, offset: int = 0, length: int | None = None) -> onnx.ModelProto:
    w = nh.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = T.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length or 64)}
    for k, v in entries.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    return _model(_tiny_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [w]))


def _nested_if(depth: int) -> onnx.GraphProto:
    if depth == 0:
        return h.make_graph([h.make_node("Identity", ["x"], ["o0"])], "leaf", [],
                            [h.make_tensor_value_info("o0", T.FLOAT, ["N", 4])])
    out = f"o{depth}"
    sub = _nested_if(depth - 1)
    node = h.make_node("If", ["c"], [out], then_branch=sub, else_branch=sub, name=f"if{depth}")
    return h.make_graph([node], f"level{depth}", [],
                        [h.make_tensor_value_info(out, T.FLOAT, ["N", 4])])


LOCAL = "local.fns"


def function_chain(levels: int, calls: int = 2, leaf: onnx.NodeProto | None = None,
                   cycle_to: int | None = None) -> onnx.ModelProto:
    """``levels`` model-local functions f0..f{levels-1}, each calling the one below ``calls``
    times in sequence (f0 holds ``leaf``, an Identity by default); the graph calls the top one
    once. Once inlined that is ``calls ** (levels - 1)`` leaves: a 2 KB file of 24 levels x 2
    calls is 2^23 nodes. ``cycle_to=k`` makes f0 call f{k} instead (recursion)."""
    opsets = [h.make_opsetid("", 17), h.make_opsetid(LOCAL, 1)]
    body = leaf or h.make_node("Identity", ["a"], ["b"])
    if cycle_to is not None:
        body = h.make_node(f"f{cycle_to}", ["a"], ["b"], domain=LOCAL)
    fns = [h.make_function(LOCAL, "f0", ["a"], ["b"], [body], opsets)]
    for k in range(1, levels):
        nodes, prev = [], "a"
        for j in range(calls):
            out = "b" if j == calls - 1 else f"t{j}"
            nodes.append(h.make_node(f"f{k - 1}", [prev], [out], domain=LOCAL))
            prev = out
        fns.append(h.make_function(LOCAL, f"f{k}", ["a"], ["b"], nodes, opsets))
    graph = _tiny_graph([h.make_node(f"f{levels - 1}", ["x"], ["y"], domain=LOCAL, name="top")])
    m = _model(graph, extra=[h.make_opsetid(LOCAL, 1)])
    m.functions.extend(fns)
    return m


def sparse_tensor(values: np.ndarray, indices: np.ndarray, dims: list[int],
                  name: str = "s") -> onnx.SparseTensorProto:
    return h.make_sparse_tensor(nh.from_array(values, name), nh.from_array(indices, name + "_idx"),
                                dims)


def _with_sparse_initializer(sp: onnx.SparseTensorProto) -> onnx.ModelProto:
    """A Relu model carrying an unused sparse initializer ``sp``."""
    m = _relu_model()
    m.graph.sparse_initializer.append(sp)
    return m


def _sparse_constant_model(sp: onnx.SparseTensorProto) -> onnx.ModelProto:
    return _model(_tiny_graph([
        h.make_node("Constant", [], ["c"], sparse_value=sp, name="sc"),
        h.make_node("Relu", ["x"], ["y"], name="relu")]))


def hostile_models() -> dict[str, tuple[onnx.ModelProto, str]]:
    """Malformed or hostile ONNX models: name -> (model, expected EngineError code)."""
    out: dict[str, tuple[onnx.ModelProto, str]] = {}

    out["ext_parent_dir"] = (_external_model("../secret.bin"), "invalid_model")
    out["ext_absolute"] = (_external_model("/etc/passwd"), "invalid_model")

    bad = nh.from_array(np.ones((4, 4), np.float32), "w")
    bad.raw_data = bad.raw_data[:20]
    out["raw_length_mismatch"] = (
        _model(_tiny_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [bad])),
        "invalid_model")

    shape = nh.from_array(np.array([1 << 20, 1 << 20, 1 << 10], np.int64), "shape")
    out["constant_of_shape_terabytes"] = (_model(h.make_graph(
        [h.make_node("ConstantOfShape", ["shape"], ["big"], name="cos"),
         h.make_node("ReduceSum", ["big"], ["s"], name="rs", keepdims=0),
         h.make_node("Add", ["x", "s"], ["y"], name="add")],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [shape])), "model_too_large")

    out["dims_2_pow_40"] = (_model(_tiny_graph([h.make_node("Relu", ["x"], ["y"])],
                                               x_shape=[1 << 40, 4], y_shape=[1 << 40, 4])),
                            "model_too_large")

    out["cyclic"] = (_model(_tiny_graph([
        h.make_node("Add", ["x", "b"], ["a"], name="n1"),
        h.make_node("Relu", ["a"], ["b"], name="n2"),
        h.make_node("Identity", ["a"], ["y"], name="n3"),
    ])), "invalid_model")

    out["duplicate_names"] = (_model(_tiny_graph([
        h.make_node("Relu", ["x"], ["a"], name="n1"),
        h.make_node("Sigmoid", ["x"], ["a"], name="n2"),
        h.make_node("Identity", ["a"], ["y"], name="n3"),
    ])), "invalid_model")

    out["unknown_domain"] = (_model(_tiny_graph([
        h.make_node("Steal", ["x"], ["y"], domain="evil.ops", name="n1")]),
        extra=[h.make_opsetid("evil.ops", 1)]), "unsupported_model")

    m = _relu_model()
    m.opset_import[0].version = 99
    out["opset_99"] = (m, "unsupported_model")

    m = _relu_model()
    m.ir_version = 99
    out["ir_version_99"] = (m, "unsupported_model")

    out["empty_graph"] = (_model(h.make_graph([], "g", [], [])), "invalid_model")

    g = _nested_if(12)
    deep = h.make_graph(
        [h.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
         h.make_node("Greater", ["s", "zero"], ["c"], name="gt"), *g.node,
         h.make_node("Identity", ["o12"], ["y"], name="out")],
        "deep", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        [nh.from_array(np.zeros((), np.float32), "zero")])
    out["deep_nesting"] = (_model(deep), "unsupported_model")

    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    out["nan_weights"] = (_model(_tiny_graph([h.make_node("MatMul", ["x", "w"], ["y"])],
                                             [nh.from_array(w, "w")])), "invalid_model")
    w = np.ones((4, 4), np.float32)
    w[0, 0] = np.inf
    out["inf_weights"] = (_model(_tiny_graph([h.make_node("MatMul", ["x", "w"], ["y"])],
                                             [nh.from_array(w, "w")])), "invalid_model")

    # Model-local functions: exponential expansion, recursion, depth, custom ops inside.
    out["functions_2_pow_24"] = (function_chain(25, 2), "model_too_large")
    out["function_recursive"] = (function_chain(1, cycle_to=0), "invalid_model")
    out["function_cycle"] = (function_chain(3, 1, cycle_to=2), "invalid_model")
    out["function_chain_too_deep"] = (function_chain(40, 1), "unsupported_model")
    m = function_chain(2, 1, leaf=h.make_node("Steal", ["a"], ["b"], domain="evil.ops"))
    m.functions[0].opset_import.append(h.make_opsetid("evil.ops", 1))
    m.opset_import.append(h.make_opsetid("evil.ops", 1))
    out["function_unknown_domain"] = (m, "unsupported_model")
    nan = nh.from_array(np.array([1.0, np.nan], np.float32), "k")
    out["function_constant_nan"] = (function_chain(2, 1, leaf=h.make_node(
        "Constant", [], ["b"], value=nan)), "invalid_model")
    huge = sparse_tensor(np.ones(1, np.float32), np.zeros(1, np.int64), [1 << 20, 1 << 20])
    out["function_sparse_constant_huge"] = (function_chain(2, 1, leaf=h.make_node(
        "Constant", [], ["b"], sparse_value=huge)), "model_too_large")

    # Sparse tensors: the dense rules apply to them too.
    out["sparse_initializer_2_pow_40"] = (_with_sparse_initializer(sparse_tensor(
        np.ones(1, np.float32), np.zeros(1, np.int64), [1 << 40])), "model_too_large")
    out["sparse_constant_huge"] = (_sparse_constant_model(huge), "model_too_large")
    out["sparse_dim_2_pow_40"] = (_with_sparse_initializer(sparse_tensor(
        np.ones(1, np.float32), np.zeros((1, 2), np.int64), [1 << 40, 1])), "model_too_large")
    out["sparse_nan_values"] = (_with_sparse_initializer(sparse_tensor(
        np.array([1.0, np.nan], np.float32), np.array([0, 3], np.int64), [4, 4])), "invalid_model")
    out["sparse_index_outside"] = (_with_sparse_initializer(sparse_tensor(
        np.ones(2, np.float32), np.array([0, 16], np.int64), [4, 4])), "invalid_model")
    out["sparse_negative_dim"] = (_with_sparse_initializer(sparse_tensor(
        np.ones(1, np.float32), np.zeros(1, np.int64), [-4, 4])), "invalid_model")
    return out


def huge_pax_header_tar(path: Path, payload: bytes, declared: int = (1 << 33) - 1) -> Path:
    """A tar whose first header is a PAX header declaring ``declared`` bytes (8 GiB) but
    holding a few: the size field (11 octal digits) is rewritten and the checksum recomputed."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(payload)
        info.pax_headers = {"comment": "x"}
        tf.addfile(info, io.BytesIO(payload))
    data = bytearray(path.read_bytes())
    assert data[156:157] == b"x"  # the PAX header comes first
    field = f"{declared:011o}\0".encode()
    assert len(field) == 12, "the size must fit 11 octal digits"
    data[124:136] = field
    data[148:156] = b" " * 8
    data[148:156] = f"{sum(data[:512]):06o}\0 ".encode()
    path.write_bytes(bytes(data))
    return path


def lying_npz(shape: tuple[int, ...] = (1 << 40,), holds: int = 16) -> bytes:
    """An .npz whose one array's header claims ``shape`` (float32) but holds ``holds`` bytes:
    numpy would allocate the claimed array before reading a zip member."""
    from numpy.lib import format as npy

    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
    member.write(b"\x00" * holds)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
    return buf.getvalue()


def write_hostile_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Hostile uploads as files: name -> (path, expected EngineError code)."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, code: str) -> None:
        p = directory / name
        p.write_bytes(data)
        out[name] = (p, code)

    put("random.onnx", np.random.default_rng(7).bytes(4096), "not_onnx")
    put("empty.onnx", b"", "not_onnx")
    put("lfs.onnx", b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        b"size 12345\n", "not_onnx")
    # Written, never read back as a pickle.
    put("pickle_disguised.onnx", pickle.dumps({"state_dict": [1.0, 2.0]}, protocol=4),
        "unsafe_format")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the layout torch.save writes
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": "tensor"}, protocol=2))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", b"\x00" * 64)
        zf.writestr("archive/version", "3\n")
    put("torch_save.pt", buf.getvalue(), "unsafe_format")
    put("torch_save_named.onnx", buf.getvalue(), "unsafe_format")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # torch.export .pt2 layout
        zf.writestr("model/archive_format", "pt2")
        zf.writestr("model/models/model.json", "{}")
        zf.writestr("model/data/constants/tensor_0", b"\x00" * 16)
    put("exported.pt2", buf.getvalue(), "unsafe_format")

    relu = _relu_model().SerializeToString()
    for kind in ("zip", "tar"):
        out[f"traversal.{kind}"] = (build_archive({"../evil.onnx": relu},
                                                  directory / f"traversal.{kind}", kind),
                                    "invalid_archive")
        out[f"absolute.{kind}"] = (build_archive({"/tmp/evil.onnx": relu},
                                                 directory / f"absolute.{kind}", kind),
                                   "invalid_archive")
    # Symlink members.
    p = directory / "symlink.tar"
    with tarfile.open(p, "w") as tf:
        info = tarfile.TarInfo("model.onnx.data")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
        info = tarfile.TarInfo("model.onnx")
        info.size = len(relu)
        tf.addfile(info, io.BytesIO(relu))
    out["symlink.tar"] = (p, "invalid_archive")
    p = directory / "symlink.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zi = zipfile.ZipInfo("model.onnx.data")
        zi.external_attr = (0o120777 << 16)
        zf.writestr(zi, "/etc/passwd")
        zf.writestr("model.onnx", relu)
    out["symlink.zip"] = (p, "invalid_archive")
    # A file and a directory of the same name ("a" then "a/model.onnx").
    for kind in ("zip", "tar"):
        out[f"file_dir_collision.{kind}"] = (build_archive(
            {"a": b"\x00" * 16, "a/model.onnx": relu}, directory / f"file_dir_collision.{kind}",
            kind), "invalid_archive")
    # Hard links, FIFOs and devices are not regular files.
    for name, kind in (("hardlink", tarfile.LNKTYPE), ("fifo", tarfile.FIFOTYPE),
                       ("device", tarfile.CHRTYPE)):
        p = directory / f"{name}.tar"
        with tarfile.open(p, "w") as tf:
            info = tarfile.TarInfo("model.onnx")
            info.size = len(relu)
            tf.addfile(info, io.BytesIO(relu))
            info = tarfile.TarInfo("model.onnx.data")
            info.type = kind
            info.linkname = "model.onnx" if kind == tarfile.LNKTYPE else ""
            tf.addfile(info)
        out[f"{name}.tar"] = (p, "invalid_archive")
    # A real PAX header of 128 KB, and one that declares 8 GiB (tarfile would read it whole).
    p = directory / "big_pax.tar"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(relu)
        info.pax_headers = {"comment": "x" * (128 << 10)}
        tf.addfile(info, io.BytesIO(relu))
    out["big_pax.tar"] = (p, "invalid_archive")
    out["huge_pax.tar"] = (huge_pax_header_tar(directory / "huge_pax.tar", relu), "invalid_archive")
    # Zip bomb: 32 MB of zeros deflate to ~32 KB.
    p = directory / "bomb.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.onnx", relu)
        zf.writestr("model.onnx.data", b"\x00" * (32 << 20))
    out["bomb.zip"] = (p, "invalid_archive")
    # An archive with no ONNX file inside.
    out["no_model.zip"] = (build_archive({"weights.bin": b"\x00" * 64}, directory / "no_model.zip"),
                           "invalid_archive")
    # A lone .onnx that points at external data (the data never came with it).
    p = directory / "lone_external.onnx"
    p.write_bytes(_external_model("model.onnx.data").SerializeToString())
    out["lone_external.onnx"] = (p, "invalid_model")
    # External data with a bogus offset, inside an archive with the data file.
    out["bogus_offset.zip"] = (build_archive(
        {"model.onnx": _external_model("w.bin", offset=1 << 20).SerializeToString(),
         "w.bin": b"\x00" * 64}, directory / "bogus_offset.zip"), "invalid_model")
    out["bogus_length.zip"] = (build_archive(
        {"model.onnx": _external_model("w.bin", length=32).SerializeToString(),
         "w.bin": b"\x00" * 64}, directory / "bogus_length.zip"), "invalid_model")
    out["ext_traversal.zip"] = (build_archive(
        {"m/model.onnx": _external_model("../../secret.bin").SerializeToString(),
         "m/w.bin": b"\x00" * 64}, directory / "ext_traversal.zip"), "invalid_model")
    out["ext_absolute.zip"] = (build_archive(
        {"model.onnx": _external_model("/etc/passwd").SerializeToString(),
         "w.bin": b"\x00" * 64}, directory / "ext_absolute.zip"), "invalid_model")
    # Every hostile ONNX model, as a plain file.
    for name, (model, code) in hostile_models().items():
        p = directory / f"{name}.onnx"
        p.write_bytes(model.SerializeToString())
        out[f"{name}.onnx"] = (p, code)
    return out
