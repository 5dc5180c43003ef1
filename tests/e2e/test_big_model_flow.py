"""A model kept in external data through the HTTP API: streamed int4, output with its data file,
the float original evaluated segment by segment.

The path a model past 2 GiB takes, at a size a test can afford: a Llama-architecture decoder
with random weights (``tests.llm.random_llama``, ~64 MB of float32 weights in
``model.onnx.data``) uploaded as a tar archive to a stack of this module's own whose inline
limit (``EDGEPRESS_EXTERNAL_DATA_INLINE_BYTES``) is 8 MiB, so its weights stay on disk and
int4 runs one weight at a time (``service.engine.weight_stream``).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.client import EdgePressClient, EdgePressError
from service.devstack import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, LocalStack, free_port
from tests.e2e.client import Api
from tests.llm import random_llama

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CONFIG = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408,
          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
          "max_position_embeddings": 256, "tie_word_embeddings": False}
INLINE_BYTES = 8 * 2**20
# The float original is evaluated segment by segment past this many bytes of weights (what a
# job under a memory limit does when they pass half of it: ``service.engine.segments``).
SEGMENT_BYTES = 16 * 2**20


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A stack of its own (the inline limit is the worker's and the API's setting), sharing
    the S3 server (started if none runs)."""
    stack = LocalStack(
        tmp_path_factory.mktemp("bigstack"), api_port=free_port(),
        worker_metrics_port=free_port(), bucket="edgepress-tests",
        prefix=f"big-{uuid.uuid4().hex[:12]}", own_redis=True,
        extra_env={
            "EDGEPRESS_EXTERNAL_DATA_INLINE_BYTES": str(INLINE_BYTES),
            "EDGEPRESS_SEGMENT_WEIGHT_BYTES": str(SEGMENT_BYTES),
            "EDGEPRESS_AUTH": "open",
            "EDGEPRESS_PROGRESS_INTERVAL_SECONDS": "0.5",
            "EDGEPRESS_S3_ACCESS_KEY": os.environ.get("EDGEPRESS_S3_ACCESS_KEY",
                                                      DEFAULT_ACCESS_KEY),
            "EDGEPRESS_S3_SECRET_KEY": os.environ.get("EDGEPRESS_S3_SECRET_KEY",
                                                      DEFAULT_SECRET_KEY),
        },
    )
    state = stack.up()
    try:
        yield Api(state.api_url)
    finally:
        stack.stop_started()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("decoder")
    model = random_llama(d / "src", CONFIG)
    archive = d / "decoder.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(model, "model.onnx")
        tf.add(model.with_name("model.onnx.data"), "model.onnx.data")
    return model, archive


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(["logits"], {"input_ids": ids,
                                               "attention_mask": np.ones_like(ids)})[0]
    return out


def _in_memory_int4(model: Path, workdir: Path) -> Path:
    """The same recipe step on the whole model in memory (today's path for small models)."""
    from service.engine.pipeline import apply_steps, save
    from service.engine.registry import PassContext, parse_recipe

    proto = onnx.load(str(model))  # weights read in: no external data left
    out, _ = apply_steps(proto, parse_recipe([{"pass": "int4_weight_only", "block_size": 32}]),
                         workdir, lambda i, cls, step_dir: PassContext(workdir=step_dir))
    save(out, workdir / "model.onnx")
    return workdir / "model.onnx"


def test_streamed_int4_through_the_api(big_stack: Api, decoder: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    model, archive = decoder
    fp32_bytes = model.with_name("model.onnx.data").stat().st_size
    uploaded = big_stack.upload_model(archive)
    assert uploaded["external_data_kept_bytes"] == fp32_bytes  # inspected so
    job = big_stack.submit(model_id=uploaded["id"], device="host",
                           recipe=[{"pass": "int4_weight_only", "block_size": 32}])
    done = big_stack.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", done.get("error")
    assert {"model.onnx", "model.onnx.data"} <= set(done["artifacts"])
    result: dict[str, Any] = done["result"]

    report = json.loads(big_stack.download(done["id"], "report.json",
                                           tmp_path / "r.json").read_text())
    notes = report["passes"][0]["notes"]
    assert notes["streamed"] is True and notes["quantized"] == 4 * 7 + 1  # every MatMul
    assert report["input"]["external_data_kept_bytes"] == fp32_bytes

    # The output keeps its weights external: the two files, side by side, as a user saves them
    # (the client checks the pair against bytes_after and runs the checker on both).
    out = tmp_path / "out"
    out.mkdir()
    client = EdgePressClient(big_stack.base)
    finished = client.get_job(done["id"])
    for name in ("model.onnx", "model.onnx.data"):
        client.download_artifact(done["id"], name, out, job=finished, check_onnx=True)
    liar = finished.model_copy(update={"result": {**(finished.result or {}),
                                                  "bytes_after": 12345}})
    elsewhere = tmp_path / "liar"
    elsewhere.mkdir()
    shutil.copyfile(out / "model.onnx", elsewhere / "model.onnx")
    with pytest.raises(EdgePressError) as refused:
        client.download_artifact(done["id"], "model.onnx.data", elsewhere, job=liar)
    assert refused.value.code == "checksum_mismatch"
    assert not (elsewhere / "model.onnx.data").exists()  # a refused pair leaves no data file
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert (out / "model.onnx").stat().st_size < 1_000_000  # the graph only
    total = (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert result["bytes_after"] == total < fp32_bytes / 3  # the embedding table stays float
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == 29

    # It runs, with the fidelity of int4 RTN itself: the logits of the model the in-memory
    # pass makes from the same weights (the same quantizer, so the same codes), and a floor
    # against the float model's (random weights: int4 at block 32 keeps ~0.96 cosine).
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 24)).astype(np.int64)
    ref, got = _logits(model, ids), _logits(out / "model.onnx", ids)
    in_memory = _in_memory_int4(model, tmp_path / "mem")
    np.testing.assert_allclose(got, _logits(in_memory, ids), rtol=1e-3, atol=1e-4)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.9, cosine
    assert result["min_cosine"] > 0.9

    # The float original was compared against a segment at a time (its weights pass the
    # stack's segment setting): fidelity, and its latency as the sum of its segments' (the
    # kernel profile only of the output, saying why). The language-model metrics against a
    # segmented original: tests/unit/engine/test_segments.py.
    latency = report["latency"]
    assert latency["original_measured"].startswith("segment by segment")
    assert latency["original_segments"]["count"] >= fp32_bytes // SEGMENT_BYTES
    assert latency["original_segments"]["largest_weight_bytes"] <= SEGMENT_BYTES
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0 and latency["noise_band"]
    assert any("segments of at most 16 MB" in w for w in result["warnings"]), result["warnings"]
    assert latency["by_op_type"]["after"] and "before_note" in latency["by_op_type"]

    # Peak memory, as the worker measured the engine process (summary "memory"). While the
    # pass streams, the process holds less than the float weights over what it held at the
    # start (the preloaded libraries): one weight at a time.
    memory = result["memory"]
    print("STREAMED", json.dumps(memory))
    assert result["peak_rss_mb"] == memory["peak_rss_mb"] >= memory["peak_rss_anon_mb"]
    fp32_mb = fp32_bytes / 2**20
    streaming = memory["by_stage_mb"]["pass:int4_weight_only"]
    assert streaming["anon"] - memory["start_rss_anon_mb"] < fp32_mb, memory
    # The float model is never resident whole: its weights are mapped a segment at a time
    # (ingest scans them through a buffer and loads the original segment by segment; what
    # building a segment's session touches stays below a segment: under 8 MB on an Intel
    # host, 10.7 MB on an AMD one), so mapped pages peak below the float model (segment +
    # output + libraries), where a whole session maps all of it.
    # (Against the libraries mapped by then: the normalise stage maps no weights.)
    stages = memory["by_stage_mb"]
    libraries = stages["normalise"]["file"]
    assert stages["evaluate"]["file"] - libraries < 0.75 * fp32_mb, memory
    assert stages["ingest"]["file"] < libraries + SEGMENT_BYTES / 2**20, memory

    # Today's path for the same weights in one .onnx file: the whole model in memory, and
    # copies of it. The streamed job's heap peaks lower by more than twice the model.
    single = tmp_path / "single.onnx"
    onnx.save_model(onnx.load(str(model)), str(single))
    inline = big_stack.wait(big_stack.submit(
        model_id=big_stack.upload_model(single)["id"], device="host",
        recipe=[{"pass": "int4_weight_only", "block_size": 32}])["id"], timeout=300)
    assert inline["state"] == "succeeded", inline.get("error")
    assert "model.onnx.data" not in inline["artifacts"]
    whole = inline["result"]["memory"]
    print("INLINE", json.dumps(whole))
    assert memory["peak_rss_anon_mb"] + 2 * fp32_mb < whole["peak_rss_anon_mb"], (memory, whole)


def test_streamed_hqq_through_the_api(big_stack: Api, decoder: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    """Data-free HQQ on the model kept in external data: one weight at a time, every MatMul's
    float zero points written as the exact correction beside the fast kernel; the embedding
    table int4 (GatherBlockQuantized), a slice of rows at a time."""
    model, archive = decoder
    uploaded = big_stack.upload_model(archive)
    job = big_stack.submit(model_id=uploaded["id"], device="host",
                           recipe=[{"pass": "int4_weight_only", "method": "hqq",
                                    "block_size": 32, "embedding": "int4"}])
    done = big_stack.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", done.get("error")
    report = json.loads(big_stack.download(done["id"], "report.json",
                                           tmp_path / "r.json").read_text())
    notes = report["passes"][0]["notes"]
    assert notes["streamed"] is True and notes["method"] == "hqq"
    assert notes["quantized"] == notes["hqq_zero_point_corrections"] == 4 * 7 + 1
    assert notes["embedding"]["precision"] == "int4" and len(notes["embedding"]["nodes"]) == 1
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        big_stack.download(done["id"], name, out / name)
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (1, 16)).astype(np.int64)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"),
                                        load_external_data=False).graph.node]
    assert ops.count("GatherBlockQuantized") == 1
    ref, got = _logits(model, ids), _logits(out / "model.onnx", ids)
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.9
    assert done["result"]["min_cosine"] > 0.9
