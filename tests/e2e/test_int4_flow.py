"""End to end on the real stack: int4 weight-only jobs with HQQ (no data) and GPTQ (a dataset)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.e2e.client import Api
from tests.models import digits_mlp

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def api(live_stack):  # type: ignore[no-untyped-def]
    return Api(live_stack.api_url)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):  # type: ignore[no-untyped-def]
    model, x_cal, x_test = digits_mlp()
    d = tmp_path_factory.mktemp("int4")
    onnx.save(model, d / "digits_mlp.onnx")
    np.savez(d / "calibration.npz", x=x_cal[:384])
    return d, x_test


@pytest.mark.parametrize("method", ["hqq", "gptq"])
def test_int4_method_through_the_api(api, digits, method) -> None:  # type: ignore[no-untyped-def]
    d, x_test = digits
    model = api.upload_model(d / "digits_mlp.onnx")
    body = {"model_id": model["id"], "device": "host",
            "recipe": [{"pass": "int4_weight_only", "method": method, "block_size": 32}]}
    if method == "gptq":
        body["dataset_id"] = api.upload_dataset(d / "calibration.npz")["id"]
    done = api.wait(api.submit(**body)["id"])
    assert done["state"] == "succeeded", done.get("error")

    report = json.loads(api.download(done["id"], "report.json", d / f"{method}.json").read_text())
    notes = report["passes"][0]["notes"]
    assert notes["method"] == method and notes["quantized"] == 2
    if method == "gptq":
        assert report["calibration"]["source"] == "dataset"
        assert report["calibration"]["method"] == "gptq"
    out = api.download(done["id"], "model.onnx", d / f"{method}.onnx")
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out)).graph.node) == 2
    feeds = {"x": x_test}
    ref = ort.InferenceSession(str(d / "digits_mlp.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert float((ref.argmax(1) == got.argmax(1)).mean()) >= 0.97


def test_awq_without_a_dataset_fails_the_job_precisely(api, digits) -> None:  # type: ignore[no-untyped-def]
    d, _ = digits
    model = api.upload_model(d / "digits_mlp.onnx")
    job = api.submit(model_id=model["id"], device="host",
                     recipe=[{"pass": "int4_weight_only", "method": "awq"}])
    done = api.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"]["code"] == "invalid_dataset"
    assert "'awq'" in done["error"]["message"] and "dataset" in done["error"]["message"]
