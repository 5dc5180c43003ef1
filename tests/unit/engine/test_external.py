"""Models kept in external data: ingest keeps the verified files, passes stream, save writes
model.onnx + model.onnx.data that ONNX Runtime loads from the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T

from service.engine.errors import EngineError
from service.engine.external import (
    BASEPATH,
    external_source,
    has_external,
    initializers,
    read_tensor,
    saved_bytes,
)
from service.engine.ingest import inspect_upload, load_model
from service.engine.limits import EngineLimits
from service.engine.pipeline import apply_steps, save
from service.engine.registry import PassContext, parse_recipe
from tests import crafted

KEEP = EngineLimits(external_data_inline_bytes=0)  # every external weight stays on disk


def _x(n: int = 8) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, 64)).astype(np.float32)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_large_external_data_is_kept_on_disk_and_read_per_tensor(tmp_path: Path,
                                                                 kind: str) -> None:
    archive = crafted.external_data_archive(tmp_path, kind)
    ingested = load_model(archive, tmp_path / "work", limits=KEEP)
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in crafted.mlp().graph.initializer}
    assert ingested.external_bytes == sum(a.nbytes for a in reference.values())
    assert ingested.description["external_data_kept_bytes"] == ingested.external_bytes
    work = (tmp_path / "work").resolve()
    for t in ingested.model.graph.initializer:
        assert t.data_location == T.EXTERNAL
        # Only the engine's own entries, pointing inside the extracted archive.
        assert {e.key for e in t.external_data} == {"location", "offset", "length", BASEPATH}
        assert external_source(t)[0].resolve().is_relative_to(work)
        np.testing.assert_array_equal(read_tensor(t), reference[t.name])
    # Under the default limit the same archive is inlined as before.
    small = load_model(archive, tmp_path / "inline")
    assert small.external_bytes == 0 and not has_external(small.model)


def test_upload_entries_are_replaced_by_the_verified_ones(tmp_path: Path) -> None:
    src = crafted.write_external_data_model(tmp_path / "src")
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:  # a basepath of its own must not survive ingest
        entry = t.external_data.add()
        entry.key, entry.value = BASEPATH, "/etc"
    (tmp_path / "src" / "model.onnx").write_bytes(model.SerializeToString())
    archive = crafted.build_archive({"model.onnx": src, "model.onnx.data":
                                     src.with_name("model.onnx.data")}, tmp_path / "m.zip")
    ingested = load_model(archive, tmp_path / "work", limits=KEEP)
    for t in ingested.model.graph.initializer:
        assert not str(external_source(t)[0]).startswith("/etc")


def test_nan_weights_are_refused_from_external_data(tmp_path: Path) -> None:
    m = crafted.mlp()
    w = onnx.numpy_helper.to_array(m.graph.initializer[2]).copy()
    w[3, 4] = np.nan
    m.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(w, "w2"))
    (tmp_path / "src").mkdir()
    onnx.save_model(m, tmp_path / "src" / "model.onnx", save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    archive = crafted.build_archive(
        {"model.onnx": tmp_path / "src" / "model.onnx",
         "model.onnx.data": tmp_path / "src" / "model.onnx.data"}, tmp_path / "m.zip")
    with pytest.raises(EngineError) as info:
        load_model(archive, tmp_path / "work", limits=KEEP)
    assert info.value.code == "invalid_model" and "NaN" in info.value.message


def test_save_references_or_copies_and_runs_from_the_path(tmp_path: Path) -> None:
    archive = crafted.external_data_archive(tmp_path)
    ingested = load_model(archive, tmp_path / "work", limits=KEEP)
    x = _x()
    expected = _run(crafted.write_external_data_model(tmp_path / "plain"), x)
    # Below the archive's folder: the data file is referenced where it is, not copied.
    beside = save(ingested.model, tmp_path / "work" / "original.onnx")
    assert not (tmp_path / "work" / "original.onnx.data").exists()
    assert len(beside) == 2
    np.testing.assert_allclose(_run(tmp_path / "work" / "original.onnx", x), expected,
                               rtol=1e-6)
    # Elsewhere: copied into model.onnx.data beside it.
    files = save(ingested.model, tmp_path / "out" / "model.onnx")
    assert files == sorted([tmp_path / "out" / "model.onnx", tmp_path / "out" / "model.onnx.data"])
    saved = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    for t in initializers(saved):
        assert {e.key for e in t.external_data} == {"location", "offset", "length"}
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.onnx", x), expected, rtol=1e-6)
    assert saved_bytes(tmp_path / "out" / "model.onnx") == sum(
        p.stat().st_size for p in files)
    assert has_external(ingested.model)  # the caller's model is left as it was


def _apply(model: onnx.ModelProto, recipe: list[dict], workdir: Path) -> onnx.ModelProto:
    out, _ = apply_steps(model, parse_recipe(recipe), workdir,
                         lambda i, cls, step_dir: PassContext(workdir=step_dir))
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_streaming_int4_matches_the_in_memory_rtn(tmp_path: Path, symmetric: bool) -> None:
    archive = crafted.external_data_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    inline = load_model(archive, tmp_path / "inline")
    recipe = [{"pass": "int4_weight_only", "block_size": 32, "symmetric": symmetric,
               "accuracy_level": 1}]
    streamed = _apply(kept.model, recipe, tmp_path / "s")
    in_memory = _apply(inline.model, recipe, tmp_path / "m")
    assert has_external(streamed)
    assert [n.op_type for n in streamed.graph.node].count("MatMulNBits") == 3
    files = save(streamed, tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx.data") in files
    save(in_memory, tmp_path / "mem.onnx")
    x = _x()
    # The same C++ quantizer on the same weights: the same codes, the same outputs.
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.onnx", x),
                               _run(tmp_path / "mem.onnx", x), rtol=1e-5, atol=1e-6)
    assert saved_bytes(tmp_path / "out" / "model.onnx") < 0.25 * kept.external_bytes


def test_streaming_int8_weight_only_keeps_fidelity(tmp_path: Path) -> None:
    archive = crafted.external_data_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    streamed = _apply(kept.model, [{"pass": "quantize_weight_only"}], tmp_path / "s")
    assert "DequantizeLinear" in {n.op_type for n in streamed.graph.node}
    save(streamed, tmp_path / "out" / "model.onnx")
    x = _x()
    ref = _run(crafted.write_external_data_model(tmp_path / "plain"), x)
    got = _run(tmp_path / "out" / "model.onnx", x)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.999
    assert not np.array_equal(ref, got)  # it did quantize
    assert saved_bytes(tmp_path / "out" / "model.onnx") < 0.35 * kept.external_bytes


def test_a_pass_that_needs_the_whole_model_is_refused(tmp_path: Path) -> None:
    kept = load_model(crafted.external_data_archive(tmp_path), tmp_path / "kept", limits=KEEP)
    with pytest.raises(EngineError) as info:
        _apply(kept.model, [{"pass": "fp16"}], tmp_path / "s")
    assert info.value.code == "model_too_large"
    assert "int4_weight_only" in info.value.message
    with pytest.raises(EngineError) as info:
        _apply(kept.model, [{"pass": "int4_weight_only", "int8_share": 0.25}], tmp_path / "h")
    assert info.value.code == "invalid_recipe" and "int8_share" in info.value.message


@pytest.mark.parametrize("step", [{"pass": "int4_weight_only", "block_size": 32},
                                  {"pass": "quantize_weight_only"}])
def test_a_recipe_job_on_a_model_kept_external(tmp_path: Path, step: dict) -> None:
    from service.engine.recipe import run_recipe

    announced: list[str] = []
    archive = crafted.external_data_archive(tmp_path)
    result = run_recipe(archive, [step], tmp_path / "job",
                        limits=KEEP.model_copy(update={"latency_runs": 3, "eval_samples": 4}),
                        artifact_ready=lambda name, path: announced.append(name))
    assert set(result.artifacts) == {"model.onnx", "model.onnx.data"}
    assert announced == ["model.onnx", "model.onnx.data"]
    data = result.artifacts["model.onnx.data"]
    assert data.parent == result.model_path.parent  # the user downloads both side by side
    size = result.report["size"]
    fp32 = sum(onnx.numpy_helper.to_array(t).nbytes for t in crafted.mlp().graph.initializer)
    assert size["bytes_before"] > fp32  # the original is its graph and its data file
    assert size["bytes_after"] == result.model_path.stat().st_size + data.stat().st_size
    assert size["bytes_after"] < 0.4 * size["bytes_before"]
    assert result.summary["min_cosine"] > 0.99
    assert result.report["input"]["external_data_kept_bytes"] == fp32
    # the float original was timed without prepacking, and the job says so
    assert result.report["latency"]["original_session_config"] == {
        "session.disable_prepacking": "1"}
    assert any("without weight prepacking" in w for w in result.summary["warnings"])


def test_inspection_says_what_a_job_will_keep(tmp_path: Path) -> None:
    archive = crafted.external_data_archive(tmp_path)
    fp32 = sum(onnx.numpy_helper.to_array(t).nbytes for t in crafted.mlp().graph.initializer)
    assert inspect_upload(archive)["external_data_kept_bytes"] == 0  # small: a job inlines it
    assert inspect_upload(archive, limits=KEEP)["external_data_kept_bytes"] == fp32
    # Inspection itself never inlines (its memory does not grow with the weights).
    seen = load_model(archive, tmp_path / "w", inline=False)
    assert has_external(seen.model) and seen.external_bytes == 0


def test_auto_on_a_model_kept_external_plans_only_what_streams(tmp_path: Path) -> None:
    from service.engine.compress import compress

    archive = crafted.external_data_archive(tmp_path)
    limits = KEEP.model_copy(update={"latency_runs": 3, "eval_samples": 4})
    result = compress(archive, "auto", tmp_path / "job", limits=limits, device="host",
                      constraints={"training": False, "workers": 1, "objective": "size"})
    auto = result.report["auto"]
    planned = {c["name"] for c in auto["candidates"]}
    assert planned and planned <= {"int4_weight_only", "int4_hqq", "int8_weight_only"}, planned
    assert all(c["status"] != "failed" for c in auto["candidates"]), auto["candidates"]
    # what needs the whole model in memory is skipped, saying so
    skipped = {s.get("candidate"): s["reason"] for s in auto["skipped_formats"]}
    assert "needs the whole model in memory" in skipped["int8_dynamic"]
    assert set(result.artifacts) == {"model.onnx", "model.onnx.data"}
    assert result.summary["min_cosine"] > 0.99 and result.summary["size_ratio"] > 2.5


def _wide_external(directory: Path, rows: int = 2048, cols: int = 4096) -> Path:
    """x [1, rows] @ w [rows, cols] with w (32 MB) in model.onnx.data, page-aligned."""
    from service.engine.external import ExternalWriter
    from service.engine.external import save as save_external

    directory.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
    with ExternalWriter(directory / "w.bin") as writer:
        weight = writer.add(w, "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", T.FLOAT, [1, rows])],
        [onnx.helper.make_tensor_value_info("y", T.FLOAT, [1, cols])], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                   ir_version=9)
    path = directory / "model.onnx"
    save_external(model, path)
    return path


def test_sessions_of_a_model_kept_external_share_one_read_only_mapping(tmp_path: Path) -> None:
    """ONNX Runtime maps external data privately and writable, once per session (each one a
    copy in the resident set once run, and in VmData, what RLIMIT_DATA counts).
    ``make_session`` hands every session views of one shared read-only mapping instead: the
    same outputs, and /proc/self/maps holds one mapping of the data file however many
    sessions read it, none of them private."""
    from service.engine import external
    from service.engine.evaluate import make_session

    path = _wide_external(tmp_path)
    data = str((tmp_path / "w.bin").resolve())
    x = np.random.default_rng(6).standard_normal((1, 2048)).astype(np.float32)
    assert [name for name, _ in external.shared_initializers(path)] == ["w"]

    def mappings() -> list[str]:  # the permission field of each mapping of the data file
        lines = Path("/proc/self/maps").read_text().splitlines()
        return [line.split()[1] for line in lines if line.endswith(" " + data)]

    options = ort.SessionOptions()  # as make_session loads float weights kept on disk
    options.add_session_config_entry("session.disable_prepacking", "1")
    plain = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
             for _ in range(2)]
    expected = plain[0].run(None, {"x": x})[0]
    own = mappings()
    del plain
    assert len(own) >= 2 and all(m.endswith("p") for m in own), own  # a private copy each

    shared = [make_session(path, 1) for _ in range(3)]
    for session in shared:
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5,
                                   atol=1e-4)
    assert mappings() == ["r--s"], mappings()  # one, read-only, shared
    del shared, session
    import gc

    gc.collect()
    assert mappings() == [] and not [k for k in external._MAPPED if k[0] == data]


def test_shared_initializers_leave_what_they_cannot_view_to_onnx_runtime(tmp_path: Path) -> None:
    """A location outside the model's folder, an offset off a cache line and a length that is
    not the tensor's are never viewed (ONNX Runtime loads or refuses those itself)."""
    from service.engine import external

    path = _wide_external(tmp_path / "m", rows=64, cols=64)
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    for entries in ({"location": "../outside.bin"}, {"offset": "4"},
                    {"length": str(64 * 64 * 4 - 4)}):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        t = bad.graph.initializer[0]
        info = {e.key: e.value for e in t.external_data} | entries
        del t.external_data[:]
        for key, value in info.items():
            e = t.external_data.add()
            e.key, e.value = key, value
        onnx.save_model(bad, str(path))
        assert external.shared_initializers(path) == [], entries


@pytest.mark.parametrize("block_size", [32, 128])
def test_streaming_hqq_matches_the_in_memory_pass(tmp_path: Path, block_size: int) -> None:
    """HQQ one weight at a time: ONNX Runtime's solver on each weight, as its whole-model
    quantizer runs it, so the same codes; float zero points as the exact correction beside
    the fast kernel where K is a multiple of the block (64 and 512 are of 32; 64 is not of
    128: that layer keeps its float zero points as inputs)."""
    archive = crafted.external_data_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    inline = load_model(archive, tmp_path / "inline")
    recipe = [{"pass": "int4_weight_only", "method": "hqq", "block_size": block_size,
               "accuracy_level": 1}]
    streamed, applied = apply_steps(kept.model, parse_recipe(recipe), tmp_path / "s",
                                    lambda i, cls, step_dir: PassContext(workdir=step_dir))
    in_memory = _apply(inline.model, recipe, tmp_path / "m")
    notes = applied[0].notes
    assert notes["streamed"] and notes["method"] == "hqq" and notes["quantized"] == 3
    assert notes["hqq_zero_point_corrections"] == (3 if block_size == 32 else 2)
    assert has_external(streamed)
    nbits = [n for n in streamed.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    kept_zeros = [len(n.input) > 3 for n in nbits]  # float zero points as inputs
    assert kept_zeros == ([False] * 3 if block_size == 32 else [True, False, False])
    save(streamed, tmp_path / "out" / "model.onnx")
    save(in_memory, tmp_path / "mem.onnx")
    x = _x()
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.onnx", x),
                               _run(tmp_path / "mem.onnx", x), rtol=1e-4, atol=1e-5)
    ref = _run(crafted.write_external_data_model(tmp_path / "plain"), x)
    got = _run(tmp_path / "out" / "model.onnx", x)
    assert not np.array_equal(ref, got)
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streaming_calibration_aware_int4_matches_the_in_memory_pass(
        tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ / AWQ on a model kept external: activations captured a group of layers at a time
    (here one layer a group), weights rounded one at a time; the same codes as the in-memory
    pass, which captures every layer at once."""
    from service.engine.passes import int4_weight_only as int4

    archive = crafted.external_data_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    inline = load_model(archive, tmp_path / "inline")
    dataset = {"x": np.random.default_rng(8).standard_normal((64, 64)).astype(np.float32)}
    recipe = parse_recipe([{"pass": "int4_weight_only", "method": method, "block_size": 32,
                            "accuracy_level": 1, "calibration_samples": 64}])

    def apply(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, dict]:
        out, applied = apply_steps(model, recipe, workdir, lambda i, cls, step_dir: PassContext(
            workdir=step_dir, dataset=dataset))
        return out, applied[0].notes

    monkeypatch.setattr(int4, "STREAM_CAPTURE_BYTES", 1)  # one input name per capture run
    # and each capture run segment by segment (a float model past what the job may hold)
    monkeypatch.setattr(int4.StreamingCapture, "limits",
                        EngineLimits(segment_weight_bytes=300_000))
    streamed, notes = apply(kept.model, tmp_path / "s")
    in_memory, memory_notes = apply(inline.model, tmp_path / "m")
    if method == "gptq":  # 64 calibration rows for 512-wide layers: said, both ways
        for n in (notes, memory_notes):
            assert n["calibration_rows"] == {"rows": 64, "widest_input": 512}
            assert any("rank-deficient" in w for w in n["warnings"])
    assert has_external(streamed)
    assert [n.op_type for n in streamed.graph.node].count("MatMulNBits") == 3
    assert notes["streamed"] and notes["method"] == method
    assert notes["streaming_capture"]["runs"] == 3  # x, r1, r2: a run each
    assert notes["streaming_capture"]["segmented"] is True
    save(streamed, tmp_path / "out" / "model.onnx")
    save(in_memory, tmp_path / "mem.onnx")
    x = _x()
    # float32 GPTQ: a code at a rounding tie may flip between runs (one step, ~1e-5 here)
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.onnx", x),
                               _run(tmp_path / "mem.onnx", x), rtol=1e-3, atol=2e-4)
    assert not list((tmp_path / "s").glob("**/probe*"))  # the hard links are gone


def _small_llama_archive(tmp_path: Path) -> tuple[Path, Path]:
    """(the exported model.onnx, a tar of it and its data): a one-layer decoder, 512 tokens."""
    from tests.llm import random_llama

    src = random_llama(tmp_path / "src", {"vocab_size": 512, "hidden_size": 64,
                                          "intermediate_size": 128, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "num_key_value_heads": 1,
                                          "max_position_embeddings": 64,
                                          "tie_word_embeddings": False})
    archive = crafted.build_archive({"model.onnx": src,
                                     "model.onnx.data": src.with_name("model.onnx.data")},
                                    tmp_path / "m.tar", "tar")
    return src, archive


def test_streaming_embedding_tables_go_int8(tmp_path: Path) -> None:
    _, archive = _small_llama_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    streamed = _apply(kept.model, [{"pass": "int4_weight_only", "embedding": "int8",
                                    "min_elements": 1024}], tmp_path / "s")
    ops = [n.op_type for n in streamed.graph.node]
    assert "MatMulNBits" in ops and ops.count("Cast") >= 1
    gathers = [n for n in streamed.graph.node if n.op_type == "Gather"]
    assert any(g.input[0].endswith("_int8") for g in gathers)


@pytest.mark.parametrize("symmetric", [True, False])
def test_streaming_embedding_tables_go_int4_as_the_in_memory_pass(
        tmp_path: Path, symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 tables on the streaming path: GatherBlockQuantized with the codes, scales and zero
    points of the in-memory pass (ONNX Runtime's quantize_ndarray), computed a slice of rows
    at a time (96 here: five slices of the 512-row table, the last one short)."""
    from service.engine import weight_stream

    monkeypatch.setattr(weight_stream, "ROWS", 96)
    src, archive = _small_llama_archive(tmp_path)
    kept = load_model(archive, tmp_path / "kept", limits=KEEP)
    inline = load_model(archive, tmp_path / "inline")
    recipe = [{"pass": "int4_weight_only", "embedding": "int4", "block_size": 32,
               "symmetric": symmetric, "min_elements": 1024, "accuracy_level": 1}]
    streamed, applied = apply_steps(kept.model, parse_recipe(recipe), tmp_path / "s",
                                    lambda i, cls, step_dir: PassContext(workdir=step_dir))
    in_memory = _apply(inline.model, recipe, tmp_path / "m")
    notes = applied[0].notes
    assert notes["streamed"] and notes["embedding"]["precision"] == "int4"
    tables = [n for n in streamed.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(tables) == 1 and not any(n.op_type == "Gather" and n.input[0] in {
        t.name for t in streamed.graph.initializer} for n in streamed.graph.node)
    assert len(tables[0].input) == (3 if symmetric else 4)
    assert has_external(streamed)
    save(streamed, tmp_path / "out" / "model.onnx")
    save(in_memory, tmp_path / "mem.onnx")
    ids = np.random.default_rng(5).integers(0, 512, (2, 12)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in (tmp_path / "out" / "model.onnx", tmp_path / "mem.onnx", src)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(outs[0], outs[2])
