"""Input resolution: given shapes and values, static dims, probing of dynamic dims, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.engine.compress import compress
from service.engine.errors import EngineError
from service.engine.ingest import load_model
from service.engine.inputs import (
    MAX_INPUT_ELEMENTS,
    check_inputs,
    default_plan,
    input_signature,
    parse_inputs,
    resolve_inputs,
)
from service.engine.limits import EngineLimits
from service.engine.normalise import normalise
from tests import crafted, real_exports

FAST = EngineLimits(eval_samples=4, latency_runs=5, latency_warmup=1)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _runs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    try:
        _session(model).run(None, feed)
    except Exception:
        return False
    return True


def _write(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def test_detector_dims_are_probed_to_a_stride_friendly_size() -> None:
    model = real_exports.stride_detector()
    unprobed = default_plan(model).feeds(1)[0]
    assert unprobed["x"].shape == (1, 3, 16, 16) and not _runs(model, unprobed)
    plan = resolve_inputs(model, _session(model))
    assert plan.shapes() == {"x": [1, 3, 320, 320]}
    record = plan.record
    assert record["probed"] and record["inputs"]["x"]["source"] == "probe"
    assert "image-like" in record["inputs"]["x"]["why"]
    failed = record["probe"]["failed"]
    assert failed[0]["shapes"] == {"x": [1, 3, 224, 224]} and "Concat" in failed[0]["error"]
    assert "/" not in failed[0]["error"].split(":")[0]  # no source paths


def test_paddle_minus_one_dims_are_dynamic_everywhere(tmp_path: Path) -> None:
    model = real_exports.paddle_classifier()
    ingested = load_model(_write(tmp_path, model), tmp_path / "w")  # once refused
    assert ingested.description["inputs"][0]["shape"] == [None, 3, None, None]
    assert ingested.description["outputs"][0]["shape"] == [None, 8]
    assert any("-1 or 0" in n for n in ingested.notes)
    assert input_signature(model)[0].dims == (None, 3, None, None)
    normalised, notes = normalise(model)  # a model that did not come through ingest
    assert any("-1 or 0" in n for n in notes)
    for v in list(normalised.graph.input) + list(normalised.graph.output):
        assert all(d.dim_value >= 0 for d in v.type.tensor_type.shape.dim)
    plan = resolve_inputs(ingested.model, _session(ingested.model))
    assert plan.shapes() == {"x": [1, 3, 224, 224]}
    result = compress(_write(tmp_path, model, "p.onnx"), [{"pass": "quantize_static"}],
                          tmp_path / "job", limits=FAST)
    assert result.report["eval_inputs"]["shapes"] == {"x": [1, 3, 224, 224]}
    assert result.report["eval_inputs"]["resolution"]["inputs"]["x"]["source"] == "probe"


def test_signal_length_scalar_value_and_state_batch_axis_are_resolved() -> None:
    model = real_exports.reflect_audio()
    unprobed = default_plan(model).feeds(1)[0]
    assert not _runs(model, unprobed)  # 16 samples cannot be reflect-padded by 64
    plan = resolve_inputs(model, _session(model))
    assert plan.shapes() == {"wave": [1, 16000], "sr": [], "state": [1, 1, 64]}
    sr = plan.record["inputs"]["sr"]
    assert sr["values"] == "the constant 16000" and "compares" in sr["why"]
    feed = plan.feeds(1)[0]
    assert feed["sr"].dtype == np.int64 and int(feed["sr"]) == 16000
    # The plan handed on as job inputs rebuilds the same feeds without probing.
    again = resolve_inputs(model, _session(model), parse_inputs(plan.as_inputs()))
    assert not again.record["probed"]
    for k, v in plan.feeds(2, seed=3)[1].items():
        np.testing.assert_array_equal(v, again.feeds(2, seed=3)[1][k])


def test_sequence_lengths_token_ids_and_masks() -> None:
    model = real_exports.token_encoder(vocab=1000, positions=64)
    plan = resolve_inputs(model, _session(model))
    assert plan.shapes() == {"ids": [1, 16], "attention_mask": [1, 16]}  # 128 > 64 positions
    assert "broadcast" in plan.record["probe"]["failed"][0]["error"]
    feeds = plan.feeds(8)
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    assert ids.min() >= 0 and ids.max() < 1000 and len(np.unique(ids)) > 50
    assert all((f["attention_mask"] == 1).all() for f in feeds)
    assert plan.record["inputs"]["ids"]["values"] == "integers in [0, 1000)"


def test_given_shapes_and_values_are_used_and_bind_shared_sizes() -> None:
    model = real_exports.stride_detector()
    plan = resolve_inputs(model, _session(model), parse_inputs({"x": {"shape": [1, 3, 128, 192]}}))
    assert plan.shapes() == {"x": [1, 3, 128, 192]}
    assert plan.record["inputs"]["x"]["source"] == "job" and not plan.record["probed"]
    tokens = real_exports.token_encoder(positions=64)
    plan = resolve_inputs(tokens, _session(tokens), parse_inputs({"ids": {"shape": [1, 40]}}))
    assert plan.shapes() == {"ids": [1, 40], "attention_mask": [1, 40]}
    audio = real_exports.reflect_audio()
    plan = resolve_inputs(audio, _session(audio), parse_inputs({"sr": {"value": 16000}}))
    assert plan.record["inputs"]["sr"]["source"] == "job"


def test_refusal_says_once_what_failed_where_and_what_to_give() -> None:
    model = real_exports.exact_size_only(side=17)
    with pytest.raises(EngineError) as info:
        resolve_inputs(model, _session(model))
    err = info.value
    assert err.code == "unsupported_model"
    assert err.message.count("Reshape node") == 1  # one reason, the shapes it failed on
    assert "x=1x3x224x224" in err.message and "more" in err.message
    assert "--input-shape x=1x3x<n>x<n>" in err.message and "dataset" in err.message
    assert err.details["tried"] == len(err.details["failures"]) or err.details["tried"] > 10
    # Given a shape that works, the same model resolves.
    plan = resolve_inputs(model, _session(model), parse_inputs({"x": {"shape": [1, 3, 17, 17]}}))
    assert plan.shapes() == {"x": [1, 3, 17, 17]}
    # A given value that the model cannot take is refused with the hint for values.
    audio = real_exports.reflect_audio()
    with pytest.raises(EngineError) as info:
        resolve_inputs(audio, _session(audio), parse_inputs({"sr": {"value": 8000}}))
    assert "Reshape" in info.value.message and "on its inputs" not in info.value.message


def test_probing_is_bounded() -> None:
    model = real_exports.exact_size_only(side=17)
    with pytest.raises(EngineError) as info:
        resolve_inputs(model, _session(model), max_trials=3)
    assert info.value.details["tried"] == 3


@pytest.mark.parametrize(
    ("inputs", "field"),
    [({"nope": {"shape": [1]}}, "inputs.nope"),
     ({"x": {"shape": [1, 3, 32]}}, "inputs.x.shape"),
     ({"x": {"shape": [2, 4, 32, 32]}}, "inputs.x.shape"),
     ({"ids": {"value": 0.5}}, "inputs.ids.value")],
)
def test_given_inputs_that_cannot_fit_are_refused(inputs: dict, field: str) -> None:
    model = real_exports.stride_detector() if "ids" not in inputs else crafted.dynamic_dims()
    slots = input_signature(model)
    if "x" in inputs:  # a static dim contradicted: channels are 3
        slots = input_signature(real_exports.stride_detector())
    with pytest.raises(EngineError) as info:
        check_inputs(parse_inputs(inputs), slots)
    assert info.value.code == "invalid_inputs"
    assert info.value.details["errors"][0]["field"] == field


@pytest.mark.parametrize(
    "raw",
    [{"x": {}}, {"x": {"shape": [0, 3]}}, {"x": {"shape": [1, -1]}},
     {"x": {"shape": [4096, 4096, 8]}}, {"x": {"value": float("inf")}},
     {"x": {"shape": [1], "extra": 1}}, {f"i{i}": {"value": 1} for i in range(65)}],
)
def test_job_inputs_are_typed_and_bounded(raw: dict) -> None:
    with pytest.raises(EngineError) as info:
        parse_inputs(raw)
    assert info.value.code == "invalid_inputs" and info.value.details["errors"]
    assert MAX_INPUT_ELEMENTS < 4096 * 4096 * 8


def test_auto_resolves_once_and_hands_the_inputs_to_every_candidate(tmp_path: Path) -> None:
    model = real_exports.stride_detector()
    result = compress(_write(tmp_path, model), "auto", tmp_path / "job", device="host",
                          constraints={"max_candidates": 2, "training": False,
                                       "objective": "size", "min_fidelity": 0.9},
                          limits=FAST)
    resolution = result.report["eval_inputs"]["resolution"]
    assert resolution["probed"] and resolution["inputs"]["x"]["shape"] == [1, 3, 320, 320]
    assert result.report["eval_inputs"]["shapes"] == {"x": [1, 3, 320, 320]}
