"""compress end to end on crafted models: every one compresses or is refused precisely.

The real ``quantize_dynamic`` and ``prune_magnitude`` passes do the compression. A few tiny passes
defined here (registered only for the test that uses them) exercise the pipeline's own rules:
``no_effect``, ``pass_failed`` wrapping, the slower-than-original warning.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine import registry
from service.engine.compress import compress
from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from service.engine.registry import Pass, PassConfig, PassContext
from service.engine.result import PipelineResult
from tests import crafted

FAST = EngineLimits(eval_samples=4, latency_runs=5, latency_warmup=1)
DYNAMIC = [{"pass": "quantize_dynamic"}]


def _write(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _check_result(result: PipelineResult, min_ratio: float) -> None:
    s = result.summary
    assert result.model_path.is_file() and result.artifacts["model.onnx"] == result.model_path
    assert s["bytes_before"] / s["bytes_after"] >= min_ratio
    assert s["size_ratio"] == pytest.approx(s["bytes_before"] / s["bytes_after"])
    assert s["min_cosine"] is not None and s["min_cosine"] >= 0.99
    assert s["eval_inputs"] == "generated"
    assert s["latency_ms_before"] > 0 and s["latency_ms_after"] > 0
    assert s["params_before"] > 0
    json.dumps(result.report)  # JSON-able
    for key in ("engine_version", "input", "normalisation", "recipe", "passes", "size",
                "latency", "fidelity", "accuracy", "summary", "warnings"):
        assert key in result.report
    # The compressed model runs on its own in ONNX Runtime, at another batch size too.
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()


# ---------------------------------------------------------------------------------------------
# Real compression on the crafted models


@pytest.mark.parametrize(
    ("builder", "feed"),
    [
        (crafted.mlp, lambda: {"x": np.ones((3, 64), np.float32)}),
        (crafted.constant_weights_opset11, lambda: {"x": np.ones((3, 1, 8, 8), np.float32)}),
        (crafted.if_branch_weights, lambda: {"x": np.ones((3, 64), np.float32)}),
        (crafted.dynamic_dims, lambda: {"ids": np.ones((3, 9), np.int64)}),
        (crafted.loop_body_weights, lambda: {"x": np.ones((3, 128), np.float32)}),
    ],
)
def test_quantize_dynamic_compresses_crafted_models(tmp_path: Path, builder, feed) -> None:  # type: ignore[no-untyped-def]
    stages: list[str] = []
    result = compress(_write(tmp_path, builder()), DYNAMIC, tmp_path / "work", limits=FAST,
                          progress=lambda stage, fraction: stages.append(stage))
    _check_result(result, 3.0)
    assert stages[0] == "ingest" and stages[-1] == "report"
    assert {"normalise", "pass:quantize_dynamic", "evaluate"} <= set(stages)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    out = session.run(None, feed())
    assert out[0].shape[0] == 3  # dynamic batch survived
    if builder is crafted.constant_weights_opset11:
        assert any("opset upgraded" in n for n in result.report["normalisation"])


def test_external_data_archive_compresses(tmp_path: Path) -> None:
    archive = crafted.external_data_archive(tmp_path, "zip")
    result = compress(archive, DYNAMIC, tmp_path / "work", limits=FAST)
    _check_result(result, 3.0)
    assert result.report["input"]["format"] == "onnx_archive"
    assert result.report["input"]["external_data"] is True
    model = onnx.load(str(result.model_path), load_external_data=False)
    assert not any(t.data_location == T.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize(
    "builder",
    [crafted.already_quantized_qdq, crafted.already_quantized_nbits,
     crafted.already_quantized_int8_initializers],
)
def test_already_quantized_models_are_refused(tmp_path: Path, builder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, builder()), DYNAMIC, tmp_path / "work", limits=FAST)
    assert info.value.code == "already_quantized"
    assert info.value.details["quantization"]


def test_dataset_with_labels_gives_accuracy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.integers(0, 10, 12))
    result = compress(_write(tmp_path, crafted.mlp()), DYNAMIC, tmp_path / "work",
                          dataset_path=tmp_path / "d.npz", limits=FAST)
    s = result.summary
    assert s["eval_inputs"] == "dataset"
    assert s["accuracy_before"] is not None and s["accuracy_after"] is not None
    assert result.report["accuracy"]["samples"] == FAST.eval_samples
    assert s["fidelity"]["logits"]["top1_agreement"] is not None


def test_pruning_is_stored_as_zstd(tmp_path: Path) -> None:
    result = compress(_write(tmp_path, crafted.mlp()),
                          [{"pass": "prune_magnitude", "sparsity": 0.8}], tmp_path / "work",
                          limits=FAST)
    zst = result.artifacts["model.onnx.zst"]
    assert zst.stat().st_size < 0.9 * result.model_path.stat().st_size
    assert result.summary["bytes_after_zstd"] == zst.stat().st_size
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(zst.read_bytes())
    assert raw == result.model_path.read_bytes()


def test_bad_recipes_fail_before_ingest(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    for recipe, code in (([], "invalid_recipe"), ([{"pass": "no_such_pass"}], "unknown_pass"),
                         ([{"pass": "quantize_dynamic", "bogus": 1}], "invalid_recipe")):
        with pytest.raises(EngineError) as info:
            compress(garbage, recipe, tmp_path / "work")
        assert info.value.code == code


def test_hostile_upload_fails_in_the_pipeline_too(tmp_path: Path) -> None:
    files = crafted.write_hostile_files(tmp_path / "h")
    for name in ("pickle_disguised.onnx", "traversal.zip", "cyclic.onnx"):
        path, code = files[name]
        with pytest.raises(EngineError) as info:
            compress(path, DYNAMIC, tmp_path / f"work_{name}")
        assert info.value.code == code


def test_cancellation_stops_the_job(tmp_path: Path) -> None:
    calls = {"n": 0}

    def cancel_on_third() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise EngineError("cancelled", "the job was cancelled")

    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), DYNAMIC, tmp_path / "work",
                     check_cancelled=cancel_on_third, limits=FAST)
    assert info.value.code == "cancelled"


# ---------------------------------------------------------------------------------------------
# The pipeline's own rules, with tiny passes registered for one test only


class _NoConfig(PassConfig):
    pass


class _Unchanged(Pass[_NoConfig]):
    """Returns the model as it came: the job must fail with no_effect."""

    name: ClassVar[str] = "test_unchanged"
    config_model = _NoConfig
    quantizes: ClassVar[bool] = False

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        return model


class _Touched(Pass[_NoConfig]):
    """Changes only a doc string: same size, same speed; must still be no_effect."""

    name: ClassVar[str] = "test_touched"
    config_model = _NoConfig

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        model.doc_string = "touched"
        return model


class _Crashes(Pass[_NoConfig]):
    """Fails like a library does, with a server path in its message."""

    name: ClassVar[str] = "test_crashes"
    config_model = _NoConfig

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        raise ValueError(f"cannot open {ctx.workdir / 'scratch' / 'tmp.onnx'}: bad things")


class _Breaks(Pass[_NoConfig]):
    """Returns a model the checker refuses."""

    name: ClassVar[str] = "test_breaks"
    config_model = _NoConfig

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        model.graph.node[0].input[0] = "nowhere"
        return model


class _SmallerButSlower(Pass[_NoConfig]):
    """Stores one weight as fp16 (smaller file) and adds a large input-dependent computation
    whose result is multiplied by zero (slower, same outputs)."""

    name: ClassVar[str] = "test_smaller_slower"
    config_model = _NoConfig

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        g = model.graph
        w2 = next(t for t in g.initializer if t.name == "w2")
        half = nh.from_array(nh.to_array(w2).astype(np.float16), "w2_half")
        g.initializer.remove(w2)
        g.initializer.extend([
            half, nh.from_array(np.array([1500, 1500], np.int64), "big_shape"),
            nh.from_array(np.array(0, np.float32), "zero"),
        ])
        out = g.output[0].name
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == out:
                    node.output[i] = "pre_out"
        g.node.insert(0, h.make_node("Cast", ["w2_half"], ["w2"], to=T.FLOAT))
        g.node.extend([
            h.make_node("ReduceMean", ["x"], ["xm"], keepdims=0),
            h.make_node("Expand", ["xm", "big_shape"], ["big"]),
            h.make_node("Sin", ["big"], ["big_sin"]),
            h.make_node("ReduceSum", ["big_sin"], ["bs"], keepdims=0),
            h.make_node("Mul", ["bs", "zero"], ["nothing"]),
            h.make_node("Add", ["pre_out", "nothing"], [out]),
        ])
        return model


@pytest.fixture
def test_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.registered_passes()  # load the real ones first
    for cls in (_Unchanged, _Touched, _Crashes, _Breaks, _SmallerButSlower):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


@pytest.mark.usefixtures("test_passes")
def test_unchanged_model_fails_with_no_effect(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_unchanged"}],
                     tmp_path / "work", limits=FAST)
    assert info.value.code == "no_effect" and "unchanged" in info.value.message
    # Not byte-identical, not smaller, not faster: decided by measurement, noise-proof.
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_touched"}],
                     tmp_path / "work2", limits=FAST)
    assert info.value.code == "no_effect"
    assert info.value.details["bytes_after"] >= info.value.details["bytes_before"]


@pytest.mark.usefixtures("test_passes")
def test_library_errors_become_pass_failed_without_paths(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_crashes"}],
                     tmp_path / "work", limits=FAST)
    err = info.value
    assert err.code == "pass_failed" and err.details["pass"] == "test_crashes"
    assert "test_crashes" in err.message and "ValueError" in err.message
    assert str(tmp_path) not in err.message and "/scratch/" not in err.message
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_breaks"}],
                     tmp_path / "work2", limits=FAST)
    assert info.value.code == "pass_failed" and "invalid model" in info.value.message


@pytest.mark.usefixtures("test_passes")
def test_smaller_but_slower_succeeds_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How much slower the extra computation is depends on the CPU: the clock is scripted
    # (original 1 ms, compressed 2 ms), so what is tested is the rule, not this host's speed.
    import service.engine.evaluate as evaluate

    def scripted(sessions: dict, feed: object, *, runs: int, warmup: int,
                 check_cancelled: object = None) -> dict[str, dict]:
        ms = {"before": 1.0, "after": 2.0, "placebo": 1.0}
        return {k: {"median_ms": ms[k], "min_ms": ms[k], "max_ms": ms[k], "runs": runs,
                    "runs_per_sample": 1, "samples_ms": [ms[k]] * runs} for k in sessions}

    monkeypatch.setattr(evaluate, "measure_latency", scripted)
    result = compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_smaller_slower"}],
                          tmp_path / "work", limits=FAST)
    s = result.summary
    assert s["size_ratio"] > 1.3 and s["speedup"] == pytest.approx(0.5)
    assert any("on this host" in w and "0.50" in w or "50% slower" in w
               for w in s["warnings"]), s["warnings"]
    assert s["min_cosine"] == pytest.approx(1.0, abs=1e-4)


def _clock(before: float, after: float, placebo: float):  # type: ignore[no-untyped-def]
    """measure_latency with fixed times per session (every thread count alike)."""
    ms = {"before": before, "after": after, "placebo": placebo}

    def scripted(sessions: dict, feed: object, *, runs: int, warmup: int,
                 check_cancelled: object = None) -> dict[str, dict]:
        return {k: {"median_ms": ms[k], "min_ms": ms[k], "max_ms": ms[k], "runs": runs,
                    "runs_per_sample": 1, "samples_ms": [ms[k]] * runs} for k in sessions}

    return scripted


@pytest.mark.usefixtures("test_passes")
@pytest.mark.parametrize(("placebo", "slower"), [(1.0, True), (1.1, False)])
def test_slower_is_said_only_outside_the_placebo_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placebo: float, slower: bool
) -> None:
    # The same 0.93x: beyond a quiet placebo (the original against itself at 1.0 ms) it is
    # slower; beside a placebo that itself differs 10 % it is within noise.
    import service.engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "measure_latency", _clock(1.0, 1.08, placebo))
    result = compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_smaller_slower"}],
                      tmp_path / "work", limits=FAST)
    s = result.summary
    assert s["speedup"] == pytest.approx(1 / 1.08)
    assert s["latency_threads"] == evaluate.latency_thread_counts(FAST, None)
    assert s["speedup_threads"] == s["speedup"] and s["speedup_1_thread"] == s["speedup"]
    low, high = s["placebo_band"]
    assert (low, high) == (pytest.approx(min(1 / placebo, placebo), abs=1e-3),
                           pytest.approx(max(1 / placebo, placebo), abs=1e-3))
    said = [w for w in s["warnings"] if "slower than the original" in w]
    assert bool(said) is slower, s["warnings"]
    for entry in result.report["latency"]["by_threads"]:
        assert entry["noise_band"] == [round(low, 4), round(high, 4)]


@pytest.mark.usefixtures("test_passes")
@pytest.mark.parametrize(("placebo", "faster"), [(1.0, True), (0.85, False)])
def test_faster_alone_must_beat_the_placebo_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placebo: float, faster: bool
) -> None:
    # A same-size model 1.11x faster: a result when the placebo is quiet, no_effect when the
    # original against itself already differs by 1.18x.
    import service.engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "measure_latency", _clock(1.0, 0.9, placebo))
    model = _write(tmp_path, crafted.mlp())
    if faster:
        result = compress(model, [{"pass": "test_touched"}], tmp_path / "work", limits=FAST)
        lat = result.report["latency"]
        assert lat["confirmed"] and lat["required_speedup"] == pytest.approx(1.1)
        assert result.summary["speedup"] == pytest.approx(1 / 0.9)
    else:
        with pytest.raises(EngineError) as info:
            compress(model, [{"pass": "test_touched"}], tmp_path / "work", limits=FAST)
        assert info.value.code == "no_effect"
        assert info.value.details["noise_band"][1] == pytest.approx(1 / 0.85, abs=1e-3)


@pytest.mark.usefixtures("test_passes")
def test_already_quantized_model_may_run_non_quantizing_passes(tmp_path: Path) -> None:
    # The refusal only concerns recipes that only quantize.
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.already_quantized_qdq()),
                     [{"pass": "test_unchanged"}], tmp_path / "work", limits=FAST)
    assert info.value.code == "no_effect"


def test_auto_delegates_to_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def run_auto(model_path: Path, workdir: Path, **kwargs: Any) -> str:
        seen.update(kwargs, model_path=model_path, workdir=workdir)
        return "delegated"

    module = types.ModuleType("service.engine.search")
    module.run_auto = run_auto  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "service.engine.search", module)
    out = compress(tmp_path / "m.onnx", "auto", tmp_path / "w", constraints={"max_bytes": 1},
                       limits=FAST)
    assert out == "delegated"
    assert seen["constraints"] == {"max_bytes": 1} and seen["limits"] is FAST
    assert set(seen) == {"model_path", "workdir", "dataset_path", "device", "constraints",
                         "progress", "check_cancelled", "resolve_model", "limits", "inputs"}


def test_model_that_fails_on_generated_inputs_is_refused_before_the_passes(
    tmp_path: Path,
) -> None:
    # Dynamic "seq" that must really be 64 (Reshape to [1, 64]): generated inputs use 16.
    g = h.make_graph(
        [h.make_node("Reshape", ["x", "shape"], ["r"]), h.make_node("MatMul", ["r", "w"], ["y"])],
        "g", [h.make_tensor_value_info("x", T.FLOAT, [1, "seq"])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 512])],
        [nh.from_array(np.array([1, 64], np.int64), "shape"),
         nh.from_array(np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32),
                       "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    stages: list[str] = []
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, model), DYNAMIC, tmp_path / "work", limits=FAST,
                     progress=lambda stage, fraction: stages.append(stage))
    assert info.value.code == "unsupported_model"
    assert "--input-shape x=1x<n>" in info.value.message and "dataset" in info.value.message
    assert "pass:quantize_dynamic" not in stages
    given = compress(_write(tmp_path, model), DYNAMIC, tmp_path / "work1", limits=FAST,
                         inputs={"x": {"shape": [1, 64]}})
    assert given.report["eval_inputs"]["resolution"]["inputs"]["x"]["source"] == "job"
    np.savez(tmp_path / "d.npz", x=np.ones((4, 64), np.float32))
    result = compress(_write(tmp_path, model), DYNAMIC, tmp_path / "work2", limits=FAST,
                          dataset_path=tmp_path / "d.npz")
    assert result.summary["eval_inputs"] == "dataset", result.summary
    assert result.summary["size_ratio"] > 3, result.summary


def test_target_device_gets_cost_model_estimates(tmp_path: Path) -> None:
    result = compress(_write(tmp_path, crafted.mlp()), DYNAMIC, tmp_path / "work",
                          device="raspberry_pi_5", limits=FAST)
    target = result.report["target"]
    assert target["device"] == "raspberry_pi_5"
    assert target["before"]["latency_ms"] > 0 and target["after"]["latency_ms"] > 0
    assert target["after"]["weight_mb"] < target["before"]["weight_mb"]
    assert result.report["device"]["name"] == "raspberry_pi_5"
    json.dumps(result.report)
    with pytest.raises(EngineError) as info:
        compress(_write(tmp_path, crafted.mlp()), DYNAMIC, tmp_path / "w2",
                     device="no_such_board", limits=FAST)
    assert info.value.code in ("unknown_device", "invalid_device")


def test_fixed_batch_cnn_with_a_dataset_through_static_int8(tmp_path: Path) -> None:
    from tests import real_exports

    x = np.random.default_rng(0).standard_normal((20, 1, 3, 32, 32)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    result = compress(_write(tmp_path, real_exports.fixed_batch_cnn()),
                          [{"pass": "quantize_static"}], tmp_path / "w", dataset_path=data,
                          limits=FAST)
    # 20 samples: every third (6) held out for evaluation, the other 14 calibrate.
    assert result.report["calibration"]["samples"] == 14
    assert result.report["evaluation"]["evaluation_samples"] == 6
    assert result.report["eval_inputs"]["shapes"] == {"x": [1, 3, 32, 32]}
    assert result.summary["min_cosine"] > 0.98


def test_recurrent_state_and_scalar_inputs_from_a_dataset(tmp_path: Path) -> None:
    from tests import real_exports

    n, rng = 6, np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, wave=rng.standard_normal((n, 1, 4000)).astype(np.float32),
             sr=np.full(n, 16000), state=rng.standard_normal((n, 1, 1, 64)).astype(np.float32))
    result = compress(_write(tmp_path, real_exports.reflect_audio()), DYNAMIC,
                          tmp_path / "w", dataset_path=data, limits=FAST)
    assert result.report["eval_inputs"]["shapes"] == {"wave": [1, 4000], "sr": [],
                                                      "state": [1, 1, 64]}
    assert result.report["eval_inputs"]["resolution"] == {"source": "dataset"}


class _RecordsItsData(Pass[_NoConfig]):
    """quantize_dynamic that also records which samples the pass was given."""

    name: ClassVar[str] = "test_records_data"
    config_model = _NoConfig
    seen: ClassVar[list[float]] = []

    def run(self, model: onnx.ModelProto, config: _NoConfig, ctx: PassContext) -> onnx.ModelProto:
        assert ctx.dataset is not None
        type(self).seen.extend(float(v) for v in np.asarray(ctx.dataset["x"])[:, 0])
        cls = registry.get_pass("quantize_dynamic")
        return cls().run(model, cls.config_model(), ctx)


@pytest.mark.parametrize("samples", [2, 12, 61])
def test_evaluation_never_sees_a_calibration_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples: int
) -> None:
    """Sample identity: x[i, 0] = 1000 + i names sample i; what the passes get and what the
    evaluation runs are disjoint, and together they are the whole dataset."""
    import service.engine.evaluate as evaluate

    registry.registered_passes()
    monkeypatch.setitem(registry._REGISTRY, _RecordsItsData.name, _RecordsItsData)
    _RecordsItsData.seen = []
    evaluated: list[float] = []
    real = evaluate.evaluate_candidate

    def recording(original: Any, candidate: Any, feeds: list, **kwargs: Any) -> Any:
        for feed in feeds:
            evaluated.extend(float(v) for v in np.atleast_2d(feed["x"])[:, 0])
        return real(original, candidate, feeds, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_candidate", recording)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 64)).astype(np.float32)
    x[:, 0] = 1000 + np.arange(samples)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.integers(0, 10, samples))
    result = compress(_write(tmp_path, crafted.mlp()), [{"pass": "test_records_data"}],
                          tmp_path / "work", dataset_path=tmp_path / "d.npz",
                          limits=EngineLimits(eval_samples=64))
    calibrated = set(_RecordsItsData.seen)
    assert calibrated and evaluated
    assert not calibrated & set(evaluated)
    assert calibrated | set(evaluated) == set(x[:, 0].tolist())
    split = result.report["evaluation"]
    assert split["disjoint"] is True
    assert split["calibration_samples"] == len(calibrated)
    assert split["evaluation_samples"] == len(set(evaluated)) == result.summary["eval_samples"]
    assert result.report["accuracy"]["samples"] == len(set(evaluated))
