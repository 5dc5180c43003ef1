"""The CPU fallback constants: fitted over every stored machine fit (scripts/fit_cpu_fallback.py),
stated with their error on a machine left out, and the ones the code uses."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine import cost_model
from service.engine.devices import get_device, list_devices

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("fit_cpu_fallback")


def _conv(channels: int, hw: int, depth: int) -> onnx.ModelProto:
    """``depth`` 3x3 Convs + Relu at ``channels`` x ``hw`` x ``hw``: compute-bound when wide,
    dispatch-bound when deep and small."""
    import numpy as np

    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array(
            np.full((channels, channels, 3, 3), 0.01, np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, hw, hw])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, channels, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _adds(elements: int, depth: int) -> onnx.ModelProto:
    """A chain of ``depth`` Adds over ``elements`` floats: memory-bound."""
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("Add", [prev, "x"], [f"a{i}"]))
        prev = f"a{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, elements])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, elements])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SHAPES = {"wide": _conv(128, 28, 2), "deep": _conv(4, 4, 40), "mid": _conv(32, 14, 6),
          "adds": _adds(1 << 22, 4), "small_adds": _adds(1 << 12, 30)}


def _record(script: Any, cpu: str, fp32: float, gbps: float, truth: dict[str, float],
            costs: dict) -> dict:
    """A stored fit as check_cost_model.py writes it, its rows made by ``truth`` on a machine
    of ``fp32`` GFLOP/s and ``gbps`` GB/s (AVX-512 VNNI kernels)."""
    record = {"machine": {"cpu": cpu, "architecture": "x86_64", "threads": 1, "cores": 2,
                          "kernel_features": ["avx2", "avx512_vnni", "avx512bw", "avx512f", "fma"],
                          "profile": {"peak_gops": {"fp32": fp32, "int8": 4 * fp32,
                                                    "int4": fp32},
                                      "memory_bandwidth_gbps": gbps}},
              "constants": {**truth, "cache_bandwidth_factor": 3.8}, "date": "2026-01-01",
              "error": {"median_abs_pct": 0.0, "loo_median_abs_pct": 0.0}}
    machine = script.machine_of(record)
    k = cost_model.Constants.from_record(record["constants"])
    record["rows"] = [{"model": name, "variant": "float", "measured_ms": ms, "fit_ms": ms}
                      for (name, _), cost in costs.items()
                      for ms in [script.estimate_ms(cost, machine, k)]]
    return record


def test_the_fallback_fit_recovers_the_constants_that_made_every_machines_latencies(script) -> None:  # type: ignore[no-untyped-def]
    # latencies made by known constants on two machines of different peaks and bandwidths
    # (not measured ones): the pooled fit finds the constants again, leaving either machine
    # out finds them from the other, and each record reproduces its own fit_ms
    costs = {(name, "float"): cost_model.analyse(m) for name, m in SHAPES.items()}
    truth = {"compute_efficiency": 0.8, "memory_efficiency": 0.5, "node_overhead_s": 2e-6}
    records = [_record(script, "fast", 170.0, 40.0, truth, costs),
               _record(script, "slow", 60.0, 15.0, truth, costs)]
    result = script.fit_fallback(records, costs)
    for name, value in truth.items():
        assert result["constants"][name] == pytest.approx(value, rel=0.03), name
    assert all(r < 1e-6 for r in result["reproduce"])
    error = result["error"]
    assert error["machines"] == 2 and error["samples"] == 2 * len(SHAPES)
    assert error["leave_machine_out_median_abs_pct"] < 3.0
    for machine in error["per_machine"]:
        assert machine["leave_machine_out"][1] < 5.0 and machine["pooled"][1] < 5.0
    code = dict(result["constants"])
    assert script.problems(result, code, dict(code)) == []
    # a fallback in the code or in the file that is not this fit's is drift
    assert any("DRIFT compute_efficiency: service/engine/cost_model.py" in p for p in
               script.problems(result, {**code, "compute_efficiency": 0.35}, dict(code)))
    assert any("DRIFT node_overhead_s: cost_fit.json" in p for p in
               script.problems(result, code, {}))


def test_a_record_that_no_longer_reproduces_its_fit_fails_the_check(script) -> None:  # type: ignore[no-untyped-def]
    # the corpus or the cost analysis changed since a machine's fit (here: its rows' fit_ms
    # 10 % off): the check refuses to fit the fallback on rows that no longer match
    costs = {(name, "float"): cost_model.analyse(m) for name, m in SHAPES.items()}
    truth = {"compute_efficiency": 0.8, "memory_efficiency": 0.5, "node_overhead_s": 2e-6}
    good = _record(script, "good", 170.0, 40.0, truth, costs)
    bad = _record(script, "bad", 60.0, 15.0, truth, costs)
    bad["rows"] = [{**r, "fit_ms": r["fit_ms"] * 1.1} for r in bad["rows"]]
    result = script.fit_fallback([good, bad], costs)
    found = script.problems(result, dict(result["constants"]), None)
    assert len(found) == 1 and found[0].startswith("bad: its profile and constants reproduce")
    # a record without its machine profile cannot be re-estimated
    bare = {**good, "machine": {k: v for k, v in good["machine"].items() if k != "profile"}}
    with pytest.raises(ValueError, match="stores no machine profile"):
        script.fit_fallback([bare], costs)


def test_the_code_uses_the_committed_fallback_fitted_over_every_stored_fit() -> None:
    fallback = cost_model.load_cpu_fallback()
    assert fallback is not None, "cost_fit.json holds the fallback (fit_cpu_fallback.py --write)"
    constants = fallback["constants"]
    assert constants["compute_efficiency"] == cost_model.COMPUTE_EFFICIENCY["cpu"]
    assert constants["memory_efficiency"] == cost_model.MEMORY_EFFICIENCY["cpu"]
    assert constants["node_overhead_s"] == cost_model.NODE_OVERHEAD_S["cpu"]
    # fitted over every stored fit: a fit added since makes this fail until it is refitted
    error = fallback["error"]
    fits = cost_model.load_cost_fits()
    assert sorted(m["cpu"] for m in error["per_machine"]) == sorted(
        f["machine"]["cpu"] for f in fits)
    assert error["machines"] == len(fits) >= 2
    assert error["samples"] == sum(len(f["rows"]) for f in fits)
    assert 0 < error["leave_machine_out_median_abs_pct"] <= error["leave_machine_out_max_abs_pct"]
    for fit in fits:  # each record stores what its fit divided time by
        assert fit["machine"]["profile"]["peak_gops"]["fp32"] > 0


def test_a_cpu_estimate_with_the_fallback_states_its_fit_and_error() -> None:
    # every built-in CPU profile without a fit on its kernels: the estimate names the machines
    # the fallback was fitted on and their leave-one-machine-out error; for an architecture
    # none of them has, it says that error does not bound the estimate. A profile with
    # constants of its own (the Raspberry Pis' compute efficiency, fitted to published
    # latencies) names the fallback constants it still takes and carries its own fit's error
    error = cost_model.load_cpu_fallback()["error"]  # type: ignore[index]
    published = cost_model.load_cost_sources()["fits"]
    model = SHAPES["mid"]
    seen = set()
    for profile in list_devices():
        if profile.kind != "cpu":
            continue
        est = cost_model.estimate(model, profile)
        notes = [a for a in est.assumptions if "the fallback, fitted on" in a]
        if cost_model.constants_for(profile).fit is not None:
            assert not notes, profile.name
            continue
        assert len(notes) == 1, profile.name
        assert f"{error['leave_machine_out_median_abs_pct']} %" in notes[0]
        if profile.cost_constants:
            assert est.constants == "sourced", profile.name
            assert notes[0].startswith("CPU constants (memory_efficiency, node_overhead_s):")
            assert est.fit_error_pct == published[profile.name]["median_abs_error_pct"]
        else:
            assert est.constants == "defaults" and notes[0].startswith("CPU constants: ")
            if profile.architecture in error["architectures"]:
                assert est.fit_error_pct == error["leave_machine_out_median_abs_pct"]
            else:
                assert est.fit_error_pct is None, profile.name
        bounded = profile.architecture in error["architectures"]
        assert ("does not bound" in notes[0]) is not bounded, profile.name
        seen.add((profile.architecture, bool(profile.cost_constants)))
    # the laptop / EPYC profiles (x86, no fit on their kernels), the phone (arm64, nothing of
    # its own) and the Raspberry Pis (arm64, their own compute efficiency)
    assert {("x86_64", False), ("arm64", False), ("arm64", True)} <= seen
    # a GPU estimate never carries it
    gpu = cost_model.estimate(model, get_device("nvidia_t4"))
    assert not any("the fallback, fitted on" in a for a in gpu.assumptions)
