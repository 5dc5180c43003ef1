"""End to end on the real stack: upload -> job -> succeeded -> download -> run in ORT."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests

from tests.e2e.client import Api
from tests.models import write_mlp

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def api(live_stack):  # type: ignore[no-untyped-def]
    return Api(live_stack.api_url)


def test_dynamic_int8_end_to_end(api, tmp_path, live_stack) -> None:  # type: ignore[no-untyped-def]
    source = write_mlp(tmp_path / "mlp.onnx", inputs=256, hidden=1024)
    model = api.upload_model(source)
    job = api.submit(model_id=model["id"], device="host", recipe=[{"pass": "quantize_dynamic"}])
    assert job["state"] == "queued"
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    states = [s for s, _ in done["_seen"]]
    assert states[-1] == "succeeded"
    assert done["started_at"] and done["finished_at"] and done["progress"] == 1.0
    result = done["result"]
    assert result["bytes_before"] == source.stat().st_size
    assert set(result["fidelity"]) == {"y"}
    assert result["fidelity"]["y"]["cosine"] > 0.99

    compressed = api.download(done["id"], "model.onnx", tmp_path / "out.onnx")
    ratio = source.stat().st_size / compressed.stat().st_size
    assert ratio >= 3.5, f"only {ratio:.2f}x smaller"
    assert result["bytes_after"] == compressed.stat().st_size
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(compressed), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == ref.shape
    cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > 0.99

    report = json.loads(api.download(done["id"], "report.json", tmp_path / "report.json").read_text())
    assert report["size"]["bytes_after"] == compressed.stat().st_size
    assert report["passes"][0]["pass"] == "quantize_dynamic"
    # Latency at 1 thread and at the host's own thread count, each with its placebo band; the
    # result carries the same numbers as the report (the decision's last).
    from service.engine.evaluate import latency_thread_counts
    from service.engine.limits import EngineLimits

    by_threads = report["latency"]["by_threads"]
    assert [e["threads"] for e in by_threads] == result["latency_threads"] == (
        latency_thread_counts(EngineLimits(), None))
    # the target's count decides, unless the host was too busy there (evaluate.decide): then
    # the 1-thread measurement does and a warning says why
    note = report["latency"].get("decision_note")
    decision = by_threads[0] if note else by_threads[-1]
    assert report["latency"]["threads"] == decision["threads"]
    assert note is None or note in result["warnings"]
    assert result["speedup"] == decision["speedup"] == report["latency"]["speedup"]
    assert result["speedup_threads"] == by_threads[-1]["speedup"]
    assert result["speedup_1_thread"] == by_threads[0]["speedup"]
    assert result["placebo_band"] == decision["noise_band"]
    for entry in by_threads:
        low, high = entry["noise_band"]
        assert low <= 1.0 <= high

    metrics = requests.get(live_stack.api_url + "/metrics", timeout=10).text
    assert "edgepress_jobs_submitted_total" in metrics
    worker_metrics = requests.get(live_stack.worker_metrics_url, timeout=10).text
    assert 'edgepress_jobs_finished_total{state="succeeded"}' in worker_metrics
    assert "edgepress_compression_ratio_bucket" in worker_metrics


def test_engine_refusal_fails_the_job_precisely(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model the engine cannot compress is a failed job with a code, never a success."""
    source = write_mlp(tmp_path / "tiny.onnx", inputs=4, hidden=4, outputs=2)
    model = api.upload_model(source)
    job = api.submit(model_id=model["id"], recipe=[{"pass": "quantize_dynamic"}])
    done = api.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"]["code"] in {"no_effect", "nothing_to_quantize"}
    assert done["error"]["message"]
    assert "/tmp" not in done["error"]["message"]


def test_int8_for_a_non_vnni_target_through_the_api(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job for an AVX2 laptop gets 7-bit weights (its u8s8 kernels saturate), says so with
    the reason, and says whether this host's kernels stand for the target's."""
    import onnx
    from onnx import numpy_helper

    from service.engine.devices import get_device, host_profile
    from tests.int8_reference import saturation_prone_mlp

    model, x, ref = saturation_prone_mlp()
    source = tmp_path / "sat.onnx"
    onnx.save_model(model, str(source))
    uploaded = api.upload_model(source)
    job = api.submit(model_id=uploaded["id"], device="x86_laptop_avx2",
                     recipe=[{"pass": "quantize_dynamic", "per_channel": False}])
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    encoding = report["passes"][0]["notes"]["encoding"]
    assert encoding["reduce_range"] is True and encoding["target"] == "x86_laptop_avx2"
    assert encoding["target_saturates"] is True and "vpmaddubsw" in encoding["reason"]
    compressed = onnx.load(str(api.download(done["id"], "model.onnx", tmp_path / "out.onnx")))
    weights = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer}
    assert int(np.abs(weights["w_quantized"].astype(np.int32)).max()) <= 64
    same = host_profile().same_kernels_as(get_device("x86_laptop_avx2"))
    assert report["measurement"]["host_is_target"] is same
    warned = any("measured with this host's kernels" in w for w in done["result"]["warnings"])
    assert warned is (not same)


def test_auto_weight_only_int8_says_how_to_load_it(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Weight-only int8 is a candidate on every device: on one whose only fast format is fp16
    it is the smallest. Its speed was measured in both ONNX Runtime sessions; the result says
    which one the reported speed assumes, and the model loaded that way runs as evaluated."""
    source = write_mlp(tmp_path / "mlp.onnx", inputs=128, hidden=512)
    model = api.upload_model(source)
    job = api.submit(model_id=model["id"], device="apple_m2", recipe="auto",
                     constraints={"objective": "size", "min_fidelity": 0.999,
                                  "training": False})
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    result = done["result"]
    assert result["size_ratio"] >= 3.5
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    assert report["auto"]["chosen"]["candidate"] == "int8_weight_only"
    settings = report["latency"]["session_settings"]
    assert set(settings) == {"default", "session.disable_quant_qdq=1"}
    config = result.get("session_config") or {}
    assert config in ({}, {"session.disable_quant_qdq": "1"})
    assert any("session.disable_quant_qdq" in w for w in result["warnings"])
    compressed = api.download(done["id"], "model.onnx", tmp_path / "out.onnx")
    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(compressed), options,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > 0.999


def test_dynamic_int8_of_a_bert_style_encoder_quantizes_its_embedding_table(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The word table holds most of the bytes: dynamic int8 stores it as int8 rows with per-row
    scales, so the encoder comes back near 4x smaller (1.5x when the table stayed float)."""
    from tests.real_exports import bert_encoder

    source = bert_encoder(tmp_path / "bert.onnx")
    model = api.upload_model(source)
    job = api.submit(model_id=model["id"], device="host", recipe=[{"pass": "quantize_dynamic"}])
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    assert done["result"]["size_ratio"] >= 3.5
    assert done["result"]["min_cosine"] >= 0.999
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    rows = [q for q in report["passes"][0]["notes"]["quantized"] if q["op"] == "Gather"]
    assert any(q["tensor"] == "words.weight" and q["scales"] == "per row" for q in rows)


def test_static_int8_of_a_paddle_style_detector_with_a_dataset(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """-1 dims that ONNX Runtime's quant_pre_process cannot follow: static int8 falls back to
    plain shape inference, says so, and quantizes on the uploaded samples."""
    from tests.real_exports import stride_detector

    source = tmp_path / "det.onnx"
    onnx.save_model(stride_detector("paddle"), str(source))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(4).random((9, 3, 128, 128), dtype=np.float32))
    model, dataset = api.upload_model(source), api.upload_dataset(data)
    job = api.submit(model_id=model["id"], dataset_id=dataset["id"], device="host",
                     recipe=[{"pass": "quantize_static"}])
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    assert done["result"]["min_cosine"] >= 0.99 and done["result"]["size_ratio"] >= 1.5
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    notes = report["passes"][0]["notes"]
    assert notes["pre_process"]["applied"] is False and notes["pre_process"]["reason"]
    assert notes["quantized_ops"]["Conv"] == 8
    assert report["calibration"]["source"] == "dataset"


@pytest.mark.slow
def test_static_int8_without_data_calibrates_on_distilled_inputs(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No dataset, a CNN with BatchNorm layers: the job calibrates on ZeroQ's distilled data
    (the planned static candidates of auto use the same default) and says so."""
    from tests.real_exports import bn_digits_cnn

    source, _, test_images = bn_digits_cnn(tmp_path / "bn.onnx")
    model = api.upload_model(source)
    job = api.submit(model_id=model["id"], device="host", recipe=[{"pass": "quantize_static"}])
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done.get("error")
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    assert report["calibration"]["source"] == "synthesised"
    assert "ZeroQ" in report["passes"][0]["notes"]["data_free"]["method"]
    assert report["passes"][0]["notes"]["data_free"]["label_term"]["applied"]
    compressed = api.download(done["id"], "model.onnx", tmp_path / "out.onnx")
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
        None, {"image": test_images})[0]
    out = ort.InferenceSession(str(compressed), providers=["CPUExecutionProvider"]).run(
        None, {"image": test_images})[0]
    # Real digits, unseen; 0.958-0.994 over eight such CNNs (docs/bench/data_free.txt).
    assert float(np.mean(ref.argmax(1) == out.argmax(1))) >= 0.95
