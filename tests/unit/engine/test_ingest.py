"""Ingest: hostile uploads are refused with precise codes; real export shapes are accepted."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from service.engine.errors import EngineError
from service.engine.ingest import MAX_OPSET, detect_quantization, inspect_upload, load_model
from service.engine.limits import EngineLimits
from tests import crafted

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return crafted.write_hostile_files(tmp_path_factory.mktemp("hostile"))


HOSTILE_NAMES = sorted([
    "random.onnx", "empty.onnx", "lfs.onnx", "pickle_disguised.onnx", "torch_save.pt",
    "torch_save_named.onnx", "exported.pt2", "traversal.zip", "traversal.tar", "absolute.zip",
    "absolute.tar", "symlink.tar", "symlink.zip", "bomb.zip", "no_model.zip",
    "lone_external.onnx", "bogus_offset.zip", "bogus_length.zip", "ext_traversal.zip", "ext_absolute.zip",
    "file_dir_collision.zip", "file_dir_collision.tar", "hardlink.tar", "fifo.tar", "device.tar",
    "big_pax.tar", "huge_pax.tar",
    *(f"{n}.onnx" for n in crafted.hostile_models()),
])


@pytest.mark.parametrize("keep", [False, True], ids=["inlined", "kept-external"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_upload_is_refused_with_its_code(
    hostile: dict[str, tuple[Path, str]], name: str, keep: bool
) -> None:
    # kept-external: every external weight stays on disk (no inline limit), and every check
    # must hold all the same
    path, code = hostile[name]
    limits = EngineLimits(external_data_inline_bytes=0) if keep else EngineLimits()
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=limits)
    assert info.value.code == code, info.value.message
    # Messages are for the client: no server paths.
    assert str(path.parent) not in info.value.message


def test_every_hostile_file_is_covered(hostile: dict[str, tuple[Path, str]]) -> None:
    assert sorted(hostile) == HOSTILE_NAMES


def test_refusals_say_what_to_send_instead(hostile: dict[str, tuple[Path, str]]) -> None:
    for name in ("pickle_disguised.onnx", "torch_save.pt", "exported.pt2", "random.onnx"):
        with pytest.raises(EngineError) as info:
            inspect_upload(hostile[name][0])
        assert "edgepress export" in info.value.message
    with pytest.raises(EngineError) as info:
        inspect_upload(hostile["lfs.onnx"][0])
    assert "git lfs pull" in info.value.message


def test_real_torch_files_are_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(4, 2)
    torch.save(module.state_dict(), tmp_path / "w.pth")
    torch.jit.save(torch.jit.script(module), tmp_path / "m.jit")
    program = torch.export.export(module, (torch.zeros(1, 4),))
    torch.export.save(program, tmp_path / "m.pt2")
    for name, what in (("w.pth", "torch.save"), ("m.jit", "TorchScript"), ("m.pt2", ".pt2")):
        with pytest.raises(EngineError) as info:
            inspect_upload(tmp_path / name, filename="model.onnx")
        assert info.value.code == "unsafe_format"
        assert what in info.value.message


@pytest.mark.parametrize(
    "builder",
    [crafted.constant_weights_opset11, crafted.if_branch_weights, crafted.dynamic_dims,
     crafted.mlp],
)
def test_float_models_are_accepted_and_described(tmp_path: Path, builder) -> None:  # type: ignore[no-untyped-def]
    model = builder()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    d = inspect_upload(path)
    assert d["format"] == "onnx"
    assert d["already_quantized"] is False and d["quantization"] == []
    assert d["parameter_count"] > 10_000
    assert d["node_count"] >= 3
    assert d["inputs"] and d["outputs"]
    assert all(isinstance(dim, (int, str)) for v in d["inputs"] for dim in v["shape"])


def test_description_keeps_dynamic_dims_and_counts_subgraph_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(crafted.dynamic_dims().SerializeToString())
    d = inspect_upload(path)
    assert d["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert d["outputs"][0]["shape"] == ["batch", "seq", 64]
    path.write_bytes(crafted.if_branch_weights().SerializeToString())
    d = inspect_upload(path)
    assert d["parameter_count"] == 2 * 64 * 256 + 1  # both branches + the scalar
    assert d["control_flow"] is True and d["subgraph_depth"] == 1
    assert d["op_types"]["If"] == 1


@pytest.mark.parametrize(
    ("builder", "formats"),
    [(crafted.already_quantized_qdq, {"qdq", "int8_initializers"}),
     (crafted.already_quantized_nbits, {"matmul_nbits"}),
     (crafted.already_quantized_int8_initializers, {"integer_ops", "int8_initializers"})],
)
def test_already_quantized_is_detected(tmp_path: Path, builder, formats: set[str]) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "q.onnx"
    path.write_bytes(builder().SerializeToString())
    d = inspect_upload(path)
    assert d["already_quantized"] is True
    assert formats <= set(d["quantization"])


def test_int4_initializers_are_detected() -> None:
    w = onnx.helper.make_tensor("w", T.INT4, [128], np.zeros(128, np.int8).tolist())
    g = h.make_graph([h.make_node("DequantizeLinear", ["w", "s"], ["y"])], "g", [],
                     [h.make_tensor_value_info("y", T.FLOAT, [128])],
                     [w, onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    assert {"int4_initializers", "qdq"} <= set(detect_quantization(m))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_with_external_data_is_inlined(tmp_path: Path, kind: str) -> None:
    archive = crafted.external_data_archive(tmp_path, kind)
    ingested = load_model(archive, tmp_path / "work")
    assert ingested.format == "onnx_archive"
    assert ingested.description["external_data"] is True
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in crafted.mlp().graph.initializer}
    for t in ingested.model.graph.initializer:
        assert t.data_location == T.DEFAULT
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), reference[t.name])


def test_archive_limits(tmp_path: Path) -> None:
    relu = crafted._relu_model().SerializeToString()
    many = crafted.build_archive({f"f{i}.txt": b"x" for i in range(10)} | {"m.onnx": relu},
                                 tmp_path / "many.zip")
    with pytest.raises(EngineError) as info:
        inspect_upload(many, limits=EngineLimits(max_archive_members=5))
    assert info.value.code == "invalid_archive"
    two = crafted.build_archive({"a.onnx": relu, "b.onnx": relu}, tmp_path / "two.zip")
    with pytest.raises(EngineError, match="more than one"):
        inspect_upload(two)
    ok = crafted.build_archive({"dir/m.onnx": relu}, tmp_path / "ok.tar", "tar")
    assert inspect_upload(ok)["format"] == "onnx_archive"


def test_zip_member_lying_about_its_size_is_stopped(tmp_path: Path) -> None:
    relu = crafted._relu_model().SerializeToString()
    path = crafted.build_archive({"m.onnx": relu, "pad.bin": b"\x01" * 4096}, tmp_path / "l.zip")
    # Patch the central directory and the local header to declare a tiny uncompressed size.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        member = zf.getinfo("pad.bin")
    local = data.find(b"PK\x03\x04", member.header_offset)
    data[local + 22:local + 26] = (16).to_bytes(4, "little")
    for pos in _find_all(data, b"PK\x01\x02"):
        name_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        if data[pos + 46:pos + 46 + name_len] == b"pad.bin":
            data[pos + 24:pos + 28] = (16).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError) as info:
        inspect_upload(path)
    assert info.value.code == "invalid_archive"


def _find_all(data: bytearray, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def test_size_limits(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(crafted.mlp().SerializeToString())
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_model_bytes=100_000))
    assert info.value.code == "model_too_large"
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_tensor_elements=1000))
    assert info.value.code == "model_too_large"
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_nodes=3))
    assert info.value.code == "model_too_large"


def test_unsorted_acyclic_graph_is_accepted(tmp_path: Path) -> None:
    g = h.make_graph(
        [h.make_node("Relu", ["a"], ["y"], name="second"),
         h.make_node("Neg", ["x"], ["a"], name="first")],
        "g", [h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info("y", T.FLOAT, [2])])
    path = tmp_path / "m.onnx"
    path.write_bytes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)],
                                  ir_version=8).SerializeToString())
    assert inspect_upload(path)["node_count"] == 2


def test_minus_inf_mask_constant_is_accepted(tmp_path: Path) -> None:
    mask = np.where(np.triu(np.ones((4, 4)), 1) > 0, -np.inf, 0).astype(np.float32)
    g = h.make_graph([h.make_node("Add", ["x", "mask"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [4, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 4])],
                     [onnx.numpy_helper.from_array(mask, "mask")])
    path = tmp_path / "m.onnx"
    path.write_bytes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)],
                                  ir_version=8).SerializeToString())
    # -inf is a legitimate attention-mask value: accepted, described, and kept as it is.
    description = inspect_upload(path)
    assert description["node_count"] == 1 and description["parameter_count"] == 16
    ingested = load_model(path, tmp_path / "work")
    kept = onnx.numpy_helper.to_array(ingested.model.graph.initializer[0])
    np.testing.assert_array_equal(kept, mask)
    assert np.isneginf(kept).sum() == 6


def test_max_opset_matches_the_installed_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")

    def loads(version: int) -> bool:
        g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, [1])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1])])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", version)], ir_version=10)
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    assert loads(MAX_OPSET[""])
    assert not loads(MAX_OPSET[""] + 1)


def test_ingest_and_dataset_import_no_onnxruntime_or_torch() -> None:
    code = (
        "import sys; import service.engine.ingest, service.engine.dataset; "
        "bad = [m for m in ('onnxruntime', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_functions_count_as_their_expanded_bodies(tmp_path: Path) -> None:
    # f0 = Identity; f1 calls f0 twice; f2 calls f1 twice; the graph calls f2 once.
    path = tmp_path / "fns.onnx"
    path.write_bytes(crafted.function_chain(3, 2).SerializeToString())
    desc = inspect_upload(path)
    assert desc["node_count"] == 1 and desc["function_count"] == 3
    assert desc["expanded_node_count"] == 1 + 2 * (1 + 2 * (1 + 1))
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_nodes=10))
    assert info.value.code == "model_too_large"
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_function_depth=2))
    assert info.value.code == "unsupported_model"
    assert inspect_upload(path, limits=EngineLimits(max_function_depth=3))["function_count"] == 3


def test_exponential_functions_are_refused_fast(tmp_path: Path) -> None:
    import time

    path = tmp_path / "bomb.onnx"
    path.write_bytes(crafted.function_chain(25, 2).SerializeToString())  # 2^24 leaves inlined
    assert path.stat().st_size < 4096
    started = time.perf_counter()
    with pytest.raises(EngineError) as info:
        inspect_upload(path)
    # Before functions were counted this upload held a worker for 11 minutes.
    assert time.perf_counter() - started < 5
    assert info.value.code == "model_too_large" and "expands" in info.value.message


def test_function_defined_twice_is_refused(tmp_path: Path) -> None:
    m = crafted.function_chain(2, 1)
    m.functions.append(m.functions[0])
    path = tmp_path / "twice.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(EngineError) as info:
        inspect_upload(path)
    assert info.value.code == "invalid_model" and "defined twice" in info.value.message


def test_function_opset_newer_than_the_runtime_is_refused(tmp_path: Path) -> None:
    m = crafted.function_chain(2, 1)
    m.functions[0].opset_import[0].version = 99
    path = tmp_path / "fn-opset.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(EngineError) as info:
        inspect_upload(path)
    assert info.value.code == "unsupported_model" and "opset 99" in info.value.message


def test_valid_sparse_initializer_is_accepted_and_counted(tmp_path: Path) -> None:
    sp = crafted.sparse_tensor(np.array([1.5, -2.0], np.float32), np.array([1, 14], np.int64), [4, 4])
    m = crafted.hostile_models()["sparse_nan_values"][0]
    del m.graph.sparse_initializer[:]
    m.graph.sparse_initializer.append(sp)
    path = tmp_path / "sparse.onnx"
    path.write_bytes(m.SerializeToString())
    desc = inspect_upload(path)
    assert desc["parameter_count"] == 2
    # Coordinate indices ([NNZ, rank]) are accepted too, and checked against each dimension.
    del m.graph.sparse_initializer[:]
    m.graph.sparse_initializer.append(crafted.sparse_tensor(
        np.array([1.0], np.float32), np.array([[3, 3]], np.int64), [4, 4]))
    path.write_bytes(m.SerializeToString())
    inspect_upload(path)
    m.graph.sparse_initializer[0].CopyFrom(crafted.sparse_tensor(
        np.array([1.0], np.float32), np.array([[0, 4]], np.int64), [4, 4]))
    path.write_bytes(m.SerializeToString())
    with pytest.raises(EngineError) as info:
        inspect_upload(path)
    assert info.value.code == "invalid_model" and "outside its shape" in info.value.message


def test_sparse_tensors_count_towards_the_model_size_once_dense(tmp_path: Path) -> None:
    # 1024 x 1024 float32 = 4 MiB once dense, from a file of a few hundred bytes.
    m = crafted.hostile_models()["sparse_nan_values"][0]
    del m.graph.sparse_initializer[:]
    m.graph.sparse_initializer.append(crafted.sparse_tensor(
        np.ones(1, np.float32), np.zeros(1, np.int64), [1024, 1024]))
    path = tmp_path / "dense.onnx"
    path.write_bytes(m.SerializeToString())
    inspect_upload(path)
    with pytest.raises(EngineError) as info:
        inspect_upload(path, limits=EngineLimits(max_model_bytes=1 << 20))
    assert info.value.code == "model_too_large" and "once dense" in info.value.message


@pytest.mark.slow  # ~10 s here, nearly all of it the ONNX checker
def test_200k_independent_identity_nodes_are_ordered_in_linear_time() -> None:
    # Every node is ready at once: a list popped from the front made this quadratic (2e10
    # steps); Kahn's ordering with a deque checks it in well under the inspection's CPU limit.
    import time

    from service.engine.ingest.validate import validate

    n = 200_000
    nodes = [h.make_node("Identity", ["x"], [f"y{i}"]) for i in range(n)]
    graph = h.make_graph(nodes, "wide", [h.make_tensor_value_info("x", T.FLOAT, [1])],
                         [h.make_tensor_value_info(f"y{n - 1}", T.FLOAT, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    started = time.process_time()
    validate(model, EngineLimits(max_nodes=n))
    assert time.process_time() - started < 20.0
