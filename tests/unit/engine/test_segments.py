"""A model run a segment at a time (``service.engine.segments``): cut by weight bytes, the
same outputs as the whole model, each segment's weights let go before the next, and a job's
evaluation that takes the segmented original where its weights pass what the job may hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.evaluate import evaluate_candidate, run_all
from service.engine.limits import EngineLimits
from service.engine.segments import SegmentedSession, plan_segments, segment_budget
from tests import crafted

ROOT = Path(__file__).resolve().parents[3]


def _chain(directory: Path, layers: int = 6, width: int = 64) -> Path:
    """x -> (MatMul, Tanh/Relu, + a skip from layer 1) x layers, plus an If whose branches
    read an outer weight and the first layer's output; every weight external."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(nh.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32),
                                   f"w{i}"))
        nodes += [h.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  h.make_node("Relu" if i % 2 else "Tanh", [f"m{i}"], [f"a{i}"])]
        if i >= 2:
            nodes.append(h.make_node("Add", [f"a{i}", "a1"], [f"r{i}"]))
            x = f"r{i}"
        else:
            x = f"a{i}"
    inits.append(nh.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32),
                               "w_branch"))
    then_g = h.make_graph([h.make_node("MatMul", ["a0", "w_branch"], ["yt"])], "then", [],
                          [h.make_tensor_value_info("yt", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Neg", ["a0"], ["ye"])], "else", [],
                          [h.make_tensor_value_info("ye", T.FLOAT, None)])
    nodes += [h.make_node("ReduceSum", [x], ["s"], keepdims=0),
              h.make_node("Greater", ["s", "zero"], ["cond"]),
              h.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
              h.make_node("Add", [x, "branch"], ["y"])]
    inits.append(nh.from_array(np.zeros((), np.float32), "zero"))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["N", width])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", width]),
                          h.make_tensor_value_info("a0", T.FLOAT, ["N", width])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _feeds(n: int = 4, width: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((3, width)).astype(np.float32)} for _ in range(n)]


def _maps(path: Path) -> int:
    return Path("/proc/self/maps").read_text().count(str(path.resolve()))


def test_segments_cut_by_weight_bytes_in_graph_order() -> None:
    graph = onnx.load_model_from_string(_chain_bytes()).graph
    layer = 64 * 64 * 4
    segments = plan_segments(graph, 2 * layer)
    assert [i for s in segments for i in s.nodes] == list(range(len(graph.node)))
    assert len(segments) >= 3
    for seg in segments:
        assert seg.weight_bytes <= 2 * layer or len(seg.weights) == 1
    # The If's branch reads w_branch and a0 from outside: its segment holds the weight and
    # takes a0 from the first segment (which also gives it as a graph output).
    last = next(s for s in segments if "w_branch" in s.weights)
    assert "a0" in last.inputs
    assert "a0" in segments[0].outputs and "a1" in segments[0].outputs
    assert set(segments[-1].outputs) <= {"y", "a0"}
    # One weight larger than the budget is a segment of its own, never refused.
    assert all(len(s.weights) <= 1 for s in plan_segments(graph, 1) if s.weight_bytes)


def _chain_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = _chain(Path(tmp))
        return onnx.load(str(path)).SerializeToString()


def test_a_segmented_session_gives_the_whole_models_outputs_and_lets_weights_go(
        tmp_path: Path) -> None:
    path = _chain(tmp_path / "m")
    data = path.with_name("model.onnx.data")
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session = SegmentedSession(path, 2 * 64 * 64 * 4, threads=1)
    assert len(session.segments) >= 3
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y", "a0"]
    feeds = _feeds()
    got = run_all(session, feeds)  # every feed through each segment in turn
    for i, feed in enumerate(feeds):
        for name, ref in zip(["y", "a0"], whole.run(None, feed), strict=True):
            np.testing.assert_allclose(got[name][i], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(session.run(["y"], feeds[0])[0], got["y"][0], rtol=1e-6)
    del whole
    assert _maps(data) == 0  # no segment's mapping outlives its run
    # While a segment's session lives, only its own weights are mapped.
    views = session.views(1)
    assert {name for name, _ in views} == set(session.segments[1].weights)
    s1 = session.session(1, views=views)
    assert _maps(data) == len(session.segments[1].weights)
    del s1, views
    assert _maps(data) == 0


def test_the_budget_follows_the_jobs_memory_limit(tmp_path: Path) -> None:
    """Under a real RLIMIT_DATA (a child process): weights past half of it run in segments of
    a fifth of it; without a limit, or with weights below half, whole. The weights are one
    sparse 200 MB file: only sizes are read."""
    directory = tmp_path / "big"
    directory.mkdir()
    weight = onnx.TensorProto(name="w", data_type=T.FLOAT, dims=[50_000_000])
    weight.data_location = T.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("offset", "0"),
                       ("length", str(200_000_000))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = h.make_graph([h.make_node("Identity", ["w"], ["y"])], "g", [],
                         [h.make_tensor_value_info("y", T.FLOAT, [50_000_000])], [weight])
    onnx.save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]),
                    str(directory / "model.onnx"))
    with open(directory / "model.onnx.data", "wb") as fh:
        fh.truncate(200_000_000)
    code = ("import json, sys, resource; from pathlib import Path; "
            "from service.engine.segments import segment_budget; "
            "from service.engine.limits import EngineLimits; "
            "limit = int(sys.argv[2]); "
            "limit and resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)); "
            "print(json.dumps(segment_budget(Path(sys.argv[1]), EngineLimits())))")

    def budget(limit: int) -> int | None:
        done = subprocess.run([sys.executable, "-c", code, str(directory / "model.onnx"),
                               str(limit)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert budget(0) is None
    assert budget(4096 << 20) is None
    assert budget(360 << 20) == int(0.2 * (360 << 20))
    # The operator's setting decides where it is set.
    assert segment_budget(directory / "model.onnx",
                          EngineLimits(segment_weight_bytes=10 << 20)) == 10 << 20
    assert segment_budget(directory / "model.onnx",
                          EngineLimits(segment_weight_bytes=400 << 20)) is None
    assert segment_budget(crafted.write_external_data_model(tmp_path / "mlp"),
                          EngineLimits()) is None


def test_an_evaluation_against_a_segmented_original_measures_the_same_fidelity(
        tmp_path: Path) -> None:
    path = _chain(tmp_path / "m")
    quantized = tmp_path / "q" / "model.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized.parent.mkdir()
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
    feeds = _feeds()
    limits = EngineLimits(latency_runs=4, latency_warmup=1, latency_target_threads=False)
    whole = evaluate_candidate(path, quantized, feeds, limits=limits)
    cut = evaluate_candidate(path, quantized, feeds,
                             limits=limits.model_copy(update={"segment_weight_bytes": 40_000}))
    for name, fid in whole["fidelity"].items():
        assert cut["fidelity"][name]["cosine"] == pytest.approx(fid["cosine"], abs=1e-6)
        assert cut["fidelity"][name]["max_abs_error"] == pytest.approx(
            fid["max_abs_error"], rel=1e-3, abs=1e-5)
    assert "latency" in cut and "original_measured" not in whole["latency"]
    latency = cut["latency"]
    assert latency["original_measured"].startswith("segment by segment")
    assert latency["original_segments"]["count"] >= 3
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0 and latency["speedup"] > 0
    assert latency["noise_band"] is not None
    assert any("run in" in w and "segments" in w for w in cut["warnings"])


def test_language_model_metrics_against_a_segmented_original(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from service.engine.decoder import decoder_spec
    from service.engine.lm import evaluate_lm

    original = tmp_path / "fp32" / "model.onnx"
    original.parent.mkdir()
    onnx.save_model(onnx.load(str(byte_lm.path)), str(original), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(byte_lm.path)), block_size=128,
                                     is_symmetric=True)
    quantizer.process()
    q = tmp_path / "rtn.onnx"
    onnx.save(quantizer.model.model, str(q))
    spec = decoder_spec(onnx.load(str(byte_lm.path)))
    assert spec is not None
    kw = {"rounds": 1, "decode_tokens": 4, "memory": False}
    whole = evaluate_lm(original, q, spec, byte_lm.heldout[:3], **kw)  # type: ignore[arg-type]
    cut = evaluate_lm(original, q, spec, byte_lm.heldout[:3],  # type: ignore[arg-type]
                      limits=EngineLimits(segment_weight_bytes=2 << 20), **kw)
    assert cut["kl_divergence"] == pytest.approx(whole["kl_divergence"], rel=1e-3)
    assert cut["top1_agreement"] == whole["top1_agreement"]
    assert cut["perplexity_before"] == pytest.approx(whole["perplexity_before"], rel=1e-5)
    assert cut["prefill_tokens_per_s_before"] is None and cut["decode_tokens_per_s_after"] > 0
    assert "original_unmeasured" in cut and "original_unmeasured" not in whole


def _resident_kb(path: Path) -> int:
    """This process's resident kB of its mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = line.rstrip().endswith(str(path.resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_a_prepacked_session_lets_go_of_the_file_pages_it_copied(tmp_path: Path) -> None:
    """int4 MatMulNBits weights are repacked when the session is made: the mapped file pages
    they were read from are let go (page cache, not the job's resident set), and the session
    still gives the same outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from service.engine.evaluate import make_session

    quantizer = MatMulNBitsQuantizer(crafted.mlp(in_features=256, hidden=1024), block_size=32,
                                     is_symmetric=True)
    quantizer.process()
    path = tmp_path / "q" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    data = path.with_name("model.onnx.data")
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    session = make_session(path, 1)
    assert _maps(data) >= 1  # the shared mapping is there...
    assert _resident_kb(data) < data.stat().st_size // 1024 // 4  # ...its copied pages are not
    for _ in range(3):
        np.testing.assert_allclose(session.run(None, {"x": x})[0], reference, rtol=1e-5,
                                   atol=1e-5)
