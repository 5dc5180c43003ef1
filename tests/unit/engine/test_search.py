"""Auto mode: constraints, candidate planning per device, the search end to end, failures.

Fast tests use small crafted models; the proof over the test corpus and three targets (x86
VNNI, ARM CPU, NVIDIA TensorRT) and the digits CNN bars are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine import cost_model
from service.engine.compress import compress
from service.engine.devices import get_device, list_devices
from service.engine.errors import EngineError
from service.engine.registry import registered_passes
from service.engine.search import (
    PLANNERS,
    AutoConstraints,
    model_family,
    parse_constraints,
    plan_candidates,
)
from service.engine.search.plan import Plan, PlanError
from service.engine.search.plan import step as plan_step
from service.engine.search.score import MIN_PLACEBO_BAND

AVAILABLE = set(registered_passes())
FAMILIES = {
    # BatchNorm statistics: static int8 can be calibrated without data (ZeroQ)
    "cnn": {"family": "cnn", "weight_share": {"conv": 0.9, "matmul": 0.1, "recurrent": 0.0, "other": 0.0},
            "op_types": {"Conv": 4, "BatchNormalization": 4}},
    "transformer": {"family": "transformer", "weight_share": {"conv": 0.0, "matmul": 0.99, "recurrent": 0.0, "other": 0.01}},
    "recurrent": {"family": "recurrent", "weight_share": {"conv": 0.0, "matmul": 0.2, "recurrent": 0.8, "other": 0.0}},
}


def _mlp(path: Path, hidden: int = 384) -> Path:
    """A float MLP whose weights dominate the file (64 -> hidden -> hidden -> 10)."""
    rng = np.random.default_rng(0)
    dims = [64, hidden, hidden, 10]
    nodes, inits, x = [], [], "x"
    for i in range(3):
        w = rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i], dims[i + 1])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"b{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        out = "logits" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == 2 else f"a{i}"], name=f"add{i}"))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"))
        x = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


# ---------------------------------------------------------------------------- constraints


def test_constraints_defaults_and_latency_object() -> None:
    c = parse_constraints(None)
    assert c.objective == "balanced" and c.min_fidelity is None
    c = parse_constraints({"max_latency_ms": {"value": 3, "where": "host"}, "objective": "size"})
    assert c.max_latency_ms == 3 and c.latency_on == "host"
    assert AutoConstraints.model_validate(c.model_dump()) == c


@pytest.mark.parametrize("bad", [{"objective": "fast"}, {"max_size_mb": -1},
                                 {"max_accuracy_drop": 2}, {"unknown": 1},
                                 {"max_latency_ms": {"value": 1, "where": "moon"}}])
def test_constraints_invalid(bad: dict) -> None:
    with pytest.raises(EngineError) as info:
        parse_constraints(bad)
    assert info.value.code == "invalid_constraints"
    assert info.value.details["errors"]


# ---------------------------------------------------------------------------- planning


def test_model_family(mlp_path: Path) -> None:
    fam = model_family(onnx.load(str(mlp_path)))
    assert fam["family"] == "mlp" and fam["weight_share"]["matmul"] > 0.99


def _plan(device: str, family: str, dataset: bool = False) -> list:
    cands, _ = plan_candidates(get_device(device), FAMILIES[family], has_dataset=dataset,
                               available=AVAILABLE, training=False)
    return cands


def test_candidates_follow_the_device_formats() -> None:
    names = {d: [c.name for c in _plan(d, "cnn")] for d in
             ("x86_xeon_spr_vnni_amx", "nvidia_t4", "raspberry_pi_4", "x86_laptop_avx2",
              "snapdragon_8_gen3", "apple_m2")}
    assert names["x86_xeon_spr_vnni_amx"][0] == "int8_u8s8"
    assert "fp16" not in names["x86_xeon_spr_vnni_amx"]
    assert names["nvidia_t4"][0] == "int8_s8s8" and "fp16" in names["nvidia_t4"]
    assert not any("dynamic" in n or "u8s8" in n for n in names["nvidia_t4"])
    assert names["raspberry_pi_4"][0] == "int8_s8s8" and "fp16" not in names["raspberry_pi_4"]
    assert names["x86_laptop_avx2"][0] == "int8_static_reduce_range"
    assert names["snapdragon_8_gen3"][0] == "int8_u8u8"
    assert names["apple_m2"] == ["fp16", "int8_weight_only"]
    # The safe win is planned for every model on every device, last, within max_candidates.
    for device in ("x86_xeon_spr_vnni_amx", "nvidia_t4", "raspberry_pi_4", "apple_m2"):
        for family in FAMILIES:
            cands = _plan(device, family)
            assert cands[-1].name == "int8_weight_only", (device, family)
            assert cands[-1].recipe == [{"pass": "quantize_weight_only"}]
    few = plan_candidates(get_device("x86_xeon_spr_vnni_amx"), FAMILIES["cnn"],
                          has_dataset=False, available=AVAILABLE, max_candidates=2)[0]
    assert len(few) == 2 and few[-1].name == "int8_weight_only"
    laptop = _plan("x86_laptop_avx2", "cnn")[0]
    assert laptop.recipe[0]["reduce_range"] is True
    # Every int8 candidate for a target whose u8s8 kernels saturate uses 7-bit weights.
    for cand in [c for f in ("cnn", "transformer", "recurrent") for c in _plan("x86_laptop_avx2", f)]:
        for step in cand.recipe:
            if step["pass"] in ("quantize_static", "quantize_dynamic"):
                assert step.get("reduce_range") is True, cand.name


def test_candidates_follow_the_model() -> None:
    cnn = [c.name for c in _plan("x86_xeon_spr_vnni_amx", "cnn")]
    assert "int8_dynamic" in cnn  # the 10 % of MatMul weights
    # with a dataset to calibrate on: static where it can, dynamic for the recurrent layers
    rnn = [c.name for c in _plan("x86_xeon_spr_vnni_amx", "recurrent", dataset=True)]
    assert rnn[0] == "int8_u8s8+dynamic_rnn" and "int8_dynamic" in rnn
    mixed = _plan("x86_xeon_spr_vnni_amx", "recurrent", dataset=True)[0]
    assert [s["pass"] for s in mixed.recipe] == ["quantize_static", "quantize_dynamic"]
    # without one (and no BatchNorm statistics to synthesise inputs from), no static int8:
    # it would be calibrated on noise
    bare = _plan("x86_xeon_spr_vnni_amx", "recurrent")
    assert bare[0].name == "int8_dynamic" and not any(
        s["pass"] == "quantize_static" for c in bare for s in c.recipe)
    tf = [c.name for c in _plan("raspberry_pi_5", "transformer")]
    assert "int4_weight_only" in tf and "fp16" in tf
    assert "int4_hqq" in tf and "int4_gptq" not in tf  # GPTQ/AWQ calibrate on a dataset
    tf_data = {c.name: c.recipe for c in plan_candidates(
        get_device("raspberry_pi_5"), FAMILIES["transformer"], has_dataset=True,
        available=AVAILABLE, training=True)[0]}
    assert tf_data["int4_gptq"] == [{"pass": "int4_weight_only", "method": "gptq"}]
    assert tf_data["int4_awq"] == [{"pass": "int4_weight_only", "method": "awq"}]
    assert "int4_weight_only" not in [c.name for c in _plan("raspberry_pi_5", "cnn")]
    with_data = [c.name for c in plan_candidates(
        get_device("x86_xeon_spr_vnni_amx"), FAMILIES["cnn"], has_dataset=True,
        available=AVAILABLE, training=True)[0]]
    assert any(n.startswith("prune_channels_50") for n in with_data)


def test_candidates_need_their_passes() -> None:
    cands, skipped = plan_candidates(get_device("nvidia_t4"), FAMILIES["cnn"], has_dataset=False,
                                     available={"fp16"}, training=False)
    assert [c.name for c in cands] == ["fp16"]  # quantize_weight_only is not available either
    assert any("quantize_static" in s["reason"] for s in skipped)


def test_every_device_format_has_a_planner() -> None:
    formats = {f for d in list_devices() for f in d.quant_formats}
    assert formats <= set(PLANNERS), f"no planner for {sorted(formats - set(PLANNERS))}"


def test_planned_steps_are_checked_against_the_pass_configs() -> None:
    assert plan_step("quantize_dynamic", reduce_range=True) == {"pass": "quantize_dynamic",
                                                           "reduce_range": True}
    with pytest.raises(PlanError, match="no option no_such_option"):
        plan_step("quantize_dynamic", no_such_option=1)
    plan = Plan(get_device("nvidia_t4"), FAMILIES["cnn"], False, AVAILABLE, False)
    plan.add("broken", lambda: [plan_step("fp16", no_such_option=1)], ["fp16"], "test", 0.5, 1.0)
    assert plan.out[0].status == "failed" and plan.out[0].error is not None
    assert plan.out[0].error["code"] == "invalid_recipe"


# ---------------------------------------------------------------------------- the search


def test_auto_on_host_meets_constraints_with_evidence(mlp_path: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    result = compress(mlp_path, "auto", tmp_path, device="host",
                          constraints={"objective": "size", "training": False},
                          progress=lambda stage, fraction: stages.append(stage))
    auto = result.report["auto"]
    assert result.model_path == tmp_path / "output" / "model.onnx"
    assert result.model_path.stat().st_size * 3 < mlp_path.stat().st_size
    assert stages[0] == "ingest" and stages[-1] == "report"
    assert any(s.startswith("search:") for s in stages)
    chosen = auto["chosen"]
    assert chosen["candidate"] in [c["name"] for c in auto["candidates"]]
    assert "meets every constraint" in chosen["why"]
    assert result.summary["min_cosine"] >= 0.99  # the default fidelity floor
    assert auto["constraints"]["min_fidelity"] == 0.99
    front = auto["pareto_front"]
    assert front["latency_source"] == "host_measured"
    assert {"size_mb", "latency_ms", "fidelity", "on_front"} <= set(front["points"][0])
    assert chosen["candidate"] in front["front"]
    cal = auto["cost_model"]["host_calibration"]
    assert cal["points"][0]["model"] == "original"
    assert all(p["measured_ms"] > 0 and p["predicted_ms"] > 0 for p in cal["points"])
    # The cost model's own host estimate (the stored fit's constants, no per-job calibration)
    # beside each measurement, with the error the fit states.
    check = cal["uncalibrated"]
    assert [p["model"] for p in check["points"]] == [p["model"] for p in cal["points"]]
    assert check["constants"] == cost_model.constants_for(get_device("host")).source
    for point in check["points"]:
        assert point["error_pct"] == pytest.approx(
            100 * (point["estimated_ms"] - point["measured_ms"]) / point["measured_ms"], rel=0.02, abs=0.5)
    for cand in auto["candidates"]:
        assert cand["status"] in ("ok", "failed", "not_run")
        if cand["status"] != "ok":
            assert cand["error"]["message"]


def test_auto_for_tensorrt_picks_its_formats(mlp_path: Path, tmp_path: Path) -> None:
    result = compress(mlp_path, "auto", tmp_path, device={"extends": "nvidia_t4"},
                          constraints={"training": False})
    auto = result.report["auto"]
    t4 = get_device("nvidia_t4")
    assert set(auto["chosen"]["formats"]) <= set(t4.quant_formats)
    tried = {f for c in auto["candidates"] for f in c["formats"]}
    assert not tried & {"int8_dynamic", "int8_static_qdq_u8s8"}  # TensorRT runs neither fast
    assert auto["target_measured"] is False and "estimate" in auto["note"]
    assert auto["pareto_front"]["latency_source"] == "target_estimate"
    assert any("estimated" in w for w in result.summary["warnings"])


def test_auto_unsatisfiable_says_what_missed(mlp_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        compress(mlp_path, "auto", tmp_path, device="x86_xeon_spr_vnni_amx",
                     constraints={"max_size_mb": 0.01, "training": False})
    err = info.value
    assert err.code == "constraints_unsatisfiable"
    assert err.details["closest"]["candidate"]
    missed = {m["constraint"]: m for m in err.details["missed"]}
    assert missed["max_size_mb"]["missed_by"] > 0
    assert missed["max_size_mb"]["limit"] == 0.01
    assert "max_size_mb" in err.message


def test_auto_refuses_bad_requests(mlp_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        compress(mlp_path, "auto", tmp_path, constraints={"max_accuracy_drop": 0.01})
    assert info.value.code == "invalid_constraints"
    with pytest.raises(EngineError) as info:
        compress(mlp_path, "auto", tmp_path, device="tpu_v9")
    assert info.value.code == "unknown_device"
    with pytest.raises(EngineError) as info:
        compress(mlp_path, "auto", tmp_path, device={"extends": "nvidia_t4", "kind": "qpu"})
    assert info.value.code == "invalid_device"


# ---------------------------------------------------------------------------- proof (slow)

PROOF_TARGETS = ("x86_xeon_spr_vnni_amx", "raspberry_pi_5", "nvidia_t4")


@pytest.fixture(scope="module")
def corpus_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.corpus import build_all

    return build_all(tmp_path_factory.mktemp("auto_corpus"))


def _dataset(model, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    path = directory / f"{model.name}_dataset.npz"
    arrays = dict(model.inputs)
    if model.labels is not None:
        arrays["labels"] = model.labels
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_auto_over_the_corpus_for_three_targets(corpus_models: dict, tmp_path: Path) -> None:
    """Every corpus model x (x86 VNNI, ARM CPU, TensorRT) meets the constraints; only on a
    target measured on this host may a model fail, and then only because every candidate
    that fits was slower here. The chosen formats are the target's fast ones and differ
    between targets."""
    chosen: dict[str, dict[str, tuple[str, ...]]] = {t: {} for t in PROOF_TARGETS}
    for target in PROOF_TARGETS:
        profile = get_device(target)
        for name, model in corpus_models.items():
            workdir = tmp_path / target / name
            workdir.mkdir(parents=True)
            try:
                result = compress(model.path, "auto", workdir,
                                      dataset_path=_dataset(model, workdir), device=target,
                                      constraints={"training": False})
            except EngineError as exc:
                # Only this host's wall clock may stand in the way: some candidate met every
                # constraint but "not slower than the original on this host", which a busy host
                # can make it miss. A fidelity, size or format miss is the search failing.
                assert exc.code == "constraints_unsatisfiable", (target, name, exc.to_dict())
                for miss in exc.details["missed"]:
                    assert {"constraint", "limit", "value"} <= set(miss)
                clock_only = [c["candidate"] for c in exc.details["candidates"]
                              if c["status"] == "ok" and c["violations"]
                              and all(v["constraint"] == "not_slower_on_host"
                                      for v in c["violations"])]
                assert clock_only, (target, name, exc.details["missed"])
                assert exc.details["auto"]["target_measured"], (target, name)
                continue
            auto = result.report["auto"]
            pick = next(c for c in auto["candidates"] if c["name"] == auto["chosen"]["candidate"])
            assert pick["meets_constraints"] and not pick["violations"]
            # the target's fast formats, or weight-only int8 (float compute: runs on every
            # device, planned for every model)
            assert set(auto["chosen"]["formats"]) <= (set(profile.quant_formats)
                                                      | {"pruning", "int8_weight_only"})
            assert result.summary["min_cosine"] >= 0.99
            if auto["target_measured"]:
                # The engine's own rule, not a claim about this CPU: the speedup the choice
                # was judged on (the summary's) is never below the placebo band's low end.
                low = (result.summary["placebo_band"] or [1.0])[0]
                assert result.summary["speedup"] >= low - 1e-4, (target, name, low)
            chosen[target][name] = tuple(auto["chosen"]["formats"])
    assert chosen["x86_xeon_spr_vnni_amx"], "auto found nothing on x86"
    for formats in chosen["nvidia_t4"].values():
        assert not set(formats) & {"int8_dynamic", "int8_static_qdq_u8s8"}
    for formats in chosen["raspberry_pi_5"].values():
        assert "int8_static_qdq_u8s8" not in formats or "int8_static_qdq_s8s8" not in formats
    differing = [name for name in corpus_models
                 if len({chosen[t].get(name) for t in PROOF_TARGETS} - {None}) > 1]
    assert differing, chosen


@pytest.mark.slow
def test_auto_digits_cnn_accuracy_drop_bars(corpus_models: dict, tmp_path: Path) -> None:
    """Issue 4's bar: >= 3.5x smaller within 0.5 accuracy points. Speed on this CPU (the
    >= 1.5x bar, not slower) is printed by scripts/bench_engine.py, never asserted on
    wall-clock: a busy host would make the job miss "not slower" and this test fail."""
    model = corpus_models["digits_cnn"]
    result = compress(model.path, "auto", tmp_path, dataset_path=_dataset(model, tmp_path),
                          device="host", constraints={"max_accuracy_drop": 0.005,
                                                      "objective": "size"})
    s = result.summary
    assert s["size_ratio"] >= 3.5
    assert s["accuracy_before"] - s["accuracy_after"] <= 0.005
    # the cost model agrees the chosen model is faster on this CPU (not a wall-clock number)
    assert result.report["auto"]["chosen"]["target_estimate"]["latency_ms"] < (
        result.report["auto"]["cost_model"]["target_original"]["latency_ms"])


# ---------------------------------------------------------------------------- search mechanics


def _cnn_with_a_sensitive_layer(path: Path) -> Path:
    """Three 3x3 convolutions; the middle one has one huge weight per output channel, so int8
    crushes its other weights: the layer the mixed-precision search must keep in float."""
    rng = np.random.default_rng(0)
    chans = [3, 32, 32, 32]
    nodes, inits, x = [], [], "x"
    for i in range(3):
        w = rng.normal(0, 0.3, (chans[i + 1], chans[i], 3, 3)).astype(np.float32)
        if i == 1:
            w[:, :, 1, 1] *= 0.01
            w[:, 0, 0, 0] = 60.0
        b = rng.normal(0, 0.1, chans[i + 1]).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="gap"))
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _clock_by_model_kind(sessions: dict, feed: object, *, runs: int, warmup: int,
                         check_cancelled: object = None) -> dict[str, dict]:
    """A scripted latency clock that reads what each session runs: static int8 (QuantizeLinear
    on activations) 1 ms, a float graph 2 ms, weight-only int8 (DequantizeLinear alone) 3 ms.
    Wall-clock time on a shared host decides nothing in the test that uses it."""
    out = {}
    for key, session in sessions.items():
        ops = {n.op_type for n in onnx.load(session._model_path).graph.node}
        ms = 1.0 if "QuantizeLinear" in ops else 3.0 if "DequantizeLinear" in ops else 2.0
        out[key] = {"median_ms": ms, "min_ms": ms, "max_ms": ms, "runs": runs,
                    "runs_per_sample": 1, "samples_ms": [ms] * runs}
    return out


def test_mixed_precision_keeps_the_sensitive_layer_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.engine.evaluate as evaluate

    path = _cnn_with_a_sensitive_layer(tmp_path / "cnn.onnx")
    # On size, the weight-only int8 planned for every model meets 0.9998 and wins; where
    # latency counts (and static int8 is the faster, as the scripted clock says), the static
    # candidate gets its sensitive layers kept float.
    monkeypatch.setattr(evaluate, "measure_latency", _clock_by_model_kind)
    # A calibration set (static int8 is not planned without data for a graph with no BatchNorm
    # statistics): 96 samples, every third held out for judging.
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(7).standard_normal((96, 3, 16, 16)).astype(np.float32))
    result = compress(path, "auto", tmp_path / "work", device="host", dataset_path=data,
                          constraints={"min_fidelity": 0.9998, "objective": "latency",
                                       "training": False})
    # 0.9998 sits between plain int8 and int8 with conv1 float for both weight encodings the
    # host may choose (measured min cosine: full range 0.99971 / 0.99993, 7-bit weights on
    # hosts without VNNI 0.99909 / 0.99989).
    auto = result.report["auto"]
    assert auto["chosen"]["candidate"].endswith("+mixed_precision")
    tried = auto["mixed_precision"]  # one record per candidate tried, always a list
    assert isinstance(tried, list) and tried
    assert all({"from", "sensitivity", "kept_float"} <= set(r) for r in tried)
    record = next(r for r in tried if r["kept_float"])
    assert auto["chosen"]["candidate"] == record["from"] + "+mixed_precision"
    assert all(set(s) == {"layer", "op", "metric_if_float", "gain"} for s in record["sensitivity"])
    assert record["sensitivity"][0]["layer"] == "conv1"  # the most sensitive, measured
    assert record["kept_float"] == ["conv1"]
    step = next(s for s in auto["chosen"]["recipe"] if s["pass"] == "quantize_static")
    assert step["nodes_to_exclude"] == ["conv1"]
    assert result.summary["min_cosine"] >= 0.9998
    plain = [c for c in auto["candidates"] if c["name"] == record["from"]][0]
    assert any(v["constraint"].startswith("min_fidelity") for v in plain["violations"])


def test_early_stop_skips_candidates_that_cannot_win(mlp_path: Path, tmp_path: Path) -> None:
    result = compress(mlp_path, "auto", tmp_path, device="host",
                          constraints={"objective": "size", "training": False})
    auto = result.report["auto"]
    assert auto["early_stop"]["stopped"]
    skipped = [c for c in auto["candidates"] if c["status"] == "not_run"]
    assert skipped and all(c["error"]["code"] == "early_stop" for c in skipped)


def test_candidates_run_in_parallel_processes(mlp_path: Path, tmp_path: Path) -> None:
    result = compress(mlp_path, "auto", tmp_path, device="x86_xeon_spr_vnni_amx",
                          constraints={"workers": 2, "training": False, "max_candidates": 3,
                                       "objective": "size"})
    auto = result.report["auto"]
    assert auto["workers"] == 2
    assert sum(c["status"] == "ok" for c in auto["candidates"]) >= 2
    assert result.model_path.exists()


def test_cancellation_stops_the_search(mlp_path: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def check_cancelled() -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise EngineError("cancelled", "the job was cancelled")

    with pytest.raises(EngineError) as info:
        compress(mlp_path, "auto", tmp_path, constraints={"training": False},
                     check_cancelled=check_cancelled)
    assert info.value.code == "cancelled"


def test_already_quantized_model_is_refused(tmp_path: Path) -> None:
    from tests.crafted import already_quantized_qdq

    path = tmp_path / "q.onnx"
    onnx.save_model(already_quantized_qdq(), str(path))
    with pytest.raises(EngineError) as info:
        compress(path, "auto", tmp_path / "work")
    assert info.value.code == "already_quantized"


def test_latency_objective_confirms_finalists_head_to_head(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice rests on the head-to-head re-measurement, not on each candidate's first
    numbers. The clock is scripted (wall-clock on a shared host decides nothing here): each
    candidate's own pipeline sees it 2x faster than the original; head to head, the finalist
    that sorts last by name is 4x faster and the others 1.25x."""
    import service.engine.evaluate as evaluate

    calls: list[list[str]] = []

    def scripted(sessions: dict, feed: object, *, runs: int, warmup: int,
                 check_cancelled: object = None) -> dict[str, dict]:
        keys = list(sessions)
        calls.append(keys)
        if "original" in keys:  # the head-to-head confirmation (+ the original's placebo)
            last = sorted(k for k in keys if k not in ("original", "placebo"))[-1]
            ms = {k: 4.0 if k in ("original", "placebo") else (1.0 if k == last else 3.2)
                  for k in keys}
        else:  # one candidate's own pipeline: "before" and "after"
            ms = {"before": 4.0, "after": 2.0, "placebo": 4.0}
        return {k: {"median_ms": v, "min_ms": v, "max_ms": v, "runs": runs,
                    "runs_per_sample": 1, "samples_ms": [v] * runs} for k, v in ms.items()}

    monkeypatch.setattr(evaluate, "measure_latency", scripted)
    result = compress(mlp_path, "auto", tmp_path, device="host",
                          constraints={"objective": "latency", "training": False, "workers": 1})
    auto = result.report["auto"]
    confirmed = auto["latency_confirmation"]
    assert confirmed is not None, "the latency objective must confirm its finalists"
    finalists = sorted(confirmed["candidates"])
    assert [k for k in calls[-1] if k not in ("original", "placebo")] == list(
        confirmed["candidates"])
    # the scripted placebo is exact (1.0): the report says so, and the not-slower gate never
    # allows less than the floor (MIN_PLACEBO_BAND)
    assert "placebo" in calls[-1] and confirmed["placebo_speedup"] == pytest.approx(1.0)
    assert confirmed["noise_band"] == pytest.approx(1.0)
    assert confirmed["not_slower_means"].startswith(f"speedup >= {1 / MIN_PLACEBO_BAND:.3f}")
    assert len(finalists) >= 2, "head to head needs more than one finalist"
    chosen = auto["chosen"]["candidate"]
    assert chosen == finalists[-1]  # the head-to-head winner, not the first numbers' tie
    assert confirmed["candidates"][chosen]["speedup"] == pytest.approx(4.0)
    assert result.summary["speedup"] == pytest.approx(4.0)
    for name in finalists[:-1]:
        assert confirmed["candidates"][name]["speedup"] == pytest.approx(1.25)


def test_constraints_are_judged_on_held_out_samples(mlp_path: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (60, 64)).astype(np.float32)
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(1)
    dataset = tmp_path / "data.npz"
    np.savez(dataset, x=x, labels=labels)
    result = compress(mlp_path, "auto", tmp_path / "work", dataset_path=dataset,
                          device="host", constraints={"max_accuracy_drop": 0.05,
                                                      "objective": "size", "training": False})
    evaluation = result.report["auto"]["evaluation"]
    assert evaluation["holdout_samples"] == 20 and evaluation["train_samples"] == 40
    assert result.summary["eval_inputs"] == "dataset_holdout"
    assert result.summary["accuracy_before"] == 1.0  # labels are the float model's answers
    assert result.summary["accuracy_before"] - result.summary["accuracy_after"] <= 0.05
    chosen = result.report["auto"]["chosen"]["candidate"]
    pick = next(c for c in result.report["auto"]["candidates"] if c["name"] == chosen)
    assert pick["metrics"]["holdout_samples"] == 20


def test_weight_only_int8_is_the_safe_win(tmp_path: Path) -> None:
    """A CPU whose only fast format is static int8 cannot quantize an LSTM (no QDQ kernels):
    the plan falls back to fp16, which misses the size budget; the int8 weights with float
    compute planned for every model fit, instead of the job failing. Its speed is measured in
    both sessions (default, weights folded at load) and the report says which it assumes."""
    rng = np.random.default_rng(3)
    inp, hidden = 64, 128
    weights = [numpy_helper.from_array(rng.normal(0, 0.1, shape).astype(np.float32), name)
               for name, shape in (("W", (1, 4 * hidden, inp)), ("R", (1, 4 * hidden, hidden)),
                                   ("B", (1, 8 * hidden)))]
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "h"], name="lstm",
                          hidden_size=hidden)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 1, "batch", hidden]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", hidden])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    mb = path.stat().st_size / 1e6
    device = {"extends": "host", "name": "static_only_cpu",
              "quant_formats": ["int8_static_qdq_u8s8"]}
    result = compress(path, "auto", tmp_path / "work", device=device,
                          constraints={"max_size_mb": round(0.4 * mb, 4), "min_fidelity": 0.999,
                                       "objective": "size", "training": False})
    auto = result.report["auto"]
    assert auto["chosen"]["candidate"] == "int8_weight_only"
    others = [c for c in auto["candidates"] if c["name"] != "int8_weight_only"]
    assert [c["name"] for c in others] == ["fp16"]
    # fp16 (half the size at best) cannot beat it on size: the search stops before it
    assert others[0]["status"] == "not_run" and others[0]["error"]["code"] == "early_stop"
    assert result.summary["size_ratio"] >= 3.5 and result.summary["min_cosine"] >= 0.999
    assert any("session.disable_quant_qdq" in w for w in result.summary["warnings"])
    settings = result.report["latency"]["session_settings"]
    assert set(settings) == {"default", "session.disable_quant_qdq=1"}
    assert all(s["speedup"] > 0 for s in settings.values())
    faster = max(settings, key=lambda k: settings[k]["speedup"])
    assert result.summary["speedup"] == settings[faster]["speedup"]
    assert (result.summary.get("session_config") or None) == settings[faster].get(
        "session_config")


@pytest.mark.parametrize(("own_band", "confirmed_band", "speed", "missed"), [
    (None, None, 0.97, True),            # no placebo: a 3 % slowdown is slower
    ([0.95, 1.05], None, 0.95, False),   # inside the band (floored at 7 %): not slower
    ([0.99, 1.01], None, 0.92, True),    # a quiet placebo: 8 % slower is past the floor
    ([0.85, 1.18], None, 0.89, True),    # a disturbed placebo allows 10 % at most
    ([0.95, 1.05], 1.01, 0.98, True),    # the head-to-head band, once measured, decides
])
def test_not_slower_on_host_allows_the_placebo_band(
    own_band: list[float] | None, confirmed_band: float | None, speed: float, missed: bool
) -> None:
    from service.engine.search.candidate import Candidate
    from service.engine.search.score import SearchContext, gate_band, violations

    ctx = SearchContext(get_device("host"), parse_constraints({"objective": "latency"}),
                        measurable=True, placebo_band=confirmed_band)
    cand = Candidate("int8", [], [], "", size_factor=0.3, speed_bound=2.0, status="ok")
    cand.metrics = {"bytes_stored": 1_000, "host_speedup": speed, "host_noise_band": own_band,
                    "target_memory_mb": 1.0, "min_cosine": 0.9999, "top1_agreement": 1.0,
                    "accuracy_drop": None, "host_latency_ms": 1.0 / speed,
                    "target_latency_ms": 1.0, "target_speedup": speed}
    found = [v for v in violations(cand, ctx) if v["constraint"] == "not_slower_on_host"]
    assert bool(found) is missed, found
    if found and (own_band or confirmed_band):
        # the candidate's own band gets the floor and the cap of the head-to-head one
        assert found[0]["placebo_band"] == pytest.approx(
            confirmed_band or gate_band(own_band[1]))


def test_parallel_candidates_are_bounded_by_cores_and_share_one_memory_budget() -> None:
    from service.engine.search.run import MIN_CANDIDATE_BYTES, memory_plan

    gib = 1 << 30
    assert memory_plan(64, 2, None) == (2, None)  # no limit to divide: the cores bound it
    workers, share = memory_plan(64, 16, (8 * gib, gib))  # 7 GiB free
    assert workers == 6 and share is not None and share >= MIN_CANDIDATE_BYTES
    assert gib + (workers + 1) * share <= 8 * gib  # this process + candidates within the limit
    assert memory_plan(4, 4, (2 * gib, gib)) == (1, gib // 2)  # too little for two: sequential


def test_a_refusal_says_each_reason_once_with_the_shapes_and_what_to_give() -> None:
    from service.engine.inputs import InputPlan, InputRule
    from service.engine.search.candidate import Candidate
    from service.engine.search.report import failures_message
    from service.engine.search.score import SearchContext

    ctx = SearchContext(get_device("raspberry_pi_5"), parse_constraints({}), measurable=False)
    ctx.inputs = InputPlan((InputRule("images", np.dtype(np.float32), (1, 3, 64, 64), "normal"),))
    ort_error = ("the compressed model does not run in ONNX Runtime: Concat: mismatched "
                 "dimensions 8 and 9")
    cands = [Candidate(name, [], [], "", 0.25, 4.0, status="failed",
                       error={"code": "pass_failed", "message": ort_error})
             for name in ("int8_static", "int8_dynamic", "int8_weight_only")]
    cands.append(Candidate("fp16", [], [], "", 0.5, 1.0, status="failed",
                           error={"code": "no_effect", "message": "left the model unchanged"}))
    text = failures_message(cands, ctx)
    assert text.count("mismatched dimensions") == 1  # one reason, said once
    assert f"int8_static, int8_dynamic, int8_weight_only: {ort_error}" in text
    assert "fp16: left the model unchanged" in text
    assert "images 1x3x64x64" in text and "--input-shape" in text and "dataset" in text
    ctx.inputs = None  # a dataset job: the shapes came from the data, nothing to suggest
    assert "--input-shape" not in failures_message(cands, ctx)


@pytest.mark.parametrize("objective", ["size", "latency", "balanced"])
def test_a_near_tie_goes_to_the_more_faithful_candidate(objective: str) -> None:
    """Scores within 1 % are level: the lower KL divergence (or higher cosine) wins; past
    that the score decides whatever the fidelity. The figures: the wide byte-level LM's GPTQ
    and AWQ block 128 (stored bytes 4,742,216 vs 4,722,548; KLD 0.00015 vs 0.00171)."""
    from service.engine.search.candidate import Candidate
    from service.engine.search.score import SearchContext, better

    ctx = SearchContext(get_device("host"), parse_constraints({"objective": objective}),
                        measurable=True)
    ctx.original_bytes, ctx.original_host_ms = 38_800_000, 10.0

    def cand(name: str, stored: int, ms: float, kld: float | None,
             cosine: float | None = None) -> Candidate:
        c = Candidate(name, [], [], "", 0.15, 2.0, status="ok")
        c.metrics = {"bytes_stored": stored, "host_latency_ms": ms, "target_latency_ms": ms,
                     "kl_divergence": kld, "min_cosine": cosine}
        return c

    gptq = cand("gptq", 4_742_216, 3.00, 0.00015)
    awq = cand("awq", 4_722_548, 2.99, 0.00171)
    assert better(gptq, awq, ctx) and not better(awq, gptq, ctx)
    smaller = cand("smaller", 4_000_000, 2.50, 0.00171)  # 16 % smaller and faster
    assert better(smaller, gptq, ctx) and not better(gptq, smaller, ctx)
    # without a language-model metric the minimum cosine judges
    a, b = cand("a", 1000, 1.0, None, 0.9990), cand("b", 995, 0.995, None, 0.9999)
    assert better(b, a, ctx)
    a.metrics["min_cosine"] = 0.99999
    assert better(a, b, ctx)
