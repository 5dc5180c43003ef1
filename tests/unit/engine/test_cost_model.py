"""The cost model: FLOPs, precision detection, roofline on profiles, memory, calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine import cost_model
from service.engine.devices import get_device, host_profile, list_devices


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _conv_model(cin: int = 3, cout: int = 4, hw: int = 8) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((cout, cin, 3, 3), np.float32), "w")
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )


def _matmul_model(k: int = 256, n: int = 512, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = numpy_helper.from_array(np.ones((k, n), dtype), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", elem, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", elem, None)],
        [w],
    )


def _qdq_matmul_model(k: int = 256, n: int = 512, act=TensorProto.UINT8) -> onnx.ModelProto:
    zero_act = np.uint8(128) if act == TensorProto.UINT8 else np.int8(0)
    inits = [
        numpy_helper.from_array(np.ones((k, n), np.int8), "wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(zero_act), "xz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_conv_flops_exact() -> None:
    cost = cost_model.analyse(_conv_model())
    (node,) = cost.nodes
    # 2 * N * Cout * H * W * Cin * kh * kw
    assert node.flops == 2 * 1 * 4 * 8 * 8 * 3 * 3 * 3
    assert node.precision == "fp32"
    assert cost.weight_bytes == 4 * 3 * 3 * 3 * 4


def test_dynamic_dims_take_documented_defaults() -> None:
    cost = cost_model.analyse(_matmul_model())
    assert cost.input_shapes["x"] == [cost_model.DEFAULT_BATCH, cost_model.DEFAULT_DYNAMIC_DIM, 256]
    assert any("batch" in a for a in cost.assumptions) and any("seq" in a for a in cost.assumptions)
    mm = next(n for n in cost.nodes if n.op_type == "MatMul")
    assert mm.flops == 2 * 1 * 128 * 256 * 512
    given = cost_model.analyse(_matmul_model(), {"x": [2, 10, 256]})
    assert next(n for n in given.nodes if n.op_type == "MatMul").flops == 2 * 2 * 10 * 256 * 512


def test_qdq_pattern_is_int8_with_its_format() -> None:
    cost = cost_model.analyse(_qdq_matmul_model())
    mm = next(n for n in cost.nodes if n.op_type == "MatMul")
    assert mm.precision == "int8" and mm.qdq_format == "int8_static_qdq_u8s8"
    assert all(n.fused for n in cost.nodes if n.name in ("dq_x", "dq_w"))
    # the MatMul reads the int8 weight, not its float dequantized copy
    assert mm.weight_bytes == 256 * 512
    s8 = cost_model.analyse(_qdq_matmul_model(act=TensorProto.INT8))
    assert next(n for n in s8.nodes if n.op_type == "MatMul").qdq_format == "int8_static_qdq_s8s8"


def test_format_support_follows_the_profile() -> None:
    u8s8 = _qdq_matmul_model()
    t4 = get_device("nvidia_t4")
    spr = get_device("x86_xeon_spr_vnni_amx")
    # TensorRT needs symmetric int8: asymmetric uint8 activations fall back
    assert "int8_static_qdq_u8s8" in cost_model.estimate(u8s8, t4).unsupported
    assert cost_model.estimate(u8s8, spr).unsupported == []
    s8 = _qdq_matmul_model(act=TensorProto.INT8)
    assert cost_model.estimate(s8, t4).unsupported == []


def test_int8_and_fp16_gains_depend_on_the_target() -> None:
    shapes = {"x": [1, 256, 1024]}
    fp32 = _matmul_model(1024, 1024)
    fp16 = _matmul_model(1024, 1024, np.float16)
    t4, pi4 = get_device("nvidia_t4"), get_device("raspberry_pi_4")
    est = {name: cost_model.estimate(m, p, input_shapes=shapes)
           for name, m, p in [("t4_32", fp32, t4), ("t4_16", fp16, t4),
                              ("pi_32", fp32, pi4), ("pi_16", fp16, pi4)]}
    assert est["t4_16"].latency_ms < 0.5 * est["t4_32"].latency_ms  # tensor cores
    assert "fp16" in est["pi_16"].unsupported  # Cortex-A72 has no fp16 arithmetic
    assert est["pi_16"].latency_ms > 0.7 * est["pi_32"].latency_ms
    q = cost_model.estimate(_qdq_matmul_model(1024, 1024), get_device("x86_xeon_spr_vnni_amx"),
                            input_shapes={"x": [1, 256, 1024]})
    f = cost_model.estimate(fp32, get_device("x86_xeon_spr_vnni_amx"), input_shapes=shapes)
    assert q.latency_ms < f.latency_ms


def test_memory_and_energy() -> None:
    model = _matmul_model(256, 512)
    est = cost_model.estimate(model, get_device("raspberry_pi_5"), input_shapes={"x": [1, 4, 256]})
    weights = 256 * 512 * 4
    activations = 4 * 256 * 4 + 4 * 512 * 4  # x and h alive together
    assert est.peak_memory_mb == pytest.approx((weights + activations) / 1e6, rel=0.01)
    assert est.energy_mj == pytest.approx(est.latency_ms * 7.0)
    assert est.to_dict()["device"] == "raspberry_pi_5"


def test_contrib_op_shapes_are_resolved() -> None:
    """MatMulNBits is unknown to onnx's shape inference; later nodes still get shapes."""
    k, n, block = 64, 32, 32
    inits = [
        numpy_helper.from_array(np.zeros((n, k // block, block // 2), np.uint8), "b"),
        numpy_helper.from_array(np.ones((n * (k // block),), np.float32), "scales"),
    ]
    node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["h"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, name="mmnb")
    model = _model([node, helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    cost = cost_model.analyse(model)
    mm, relu = cost.nodes
    assert mm.precision == "int4" and mm.flops == 2 * 8 * n * k
    assert relu.flops == 8 * n


def test_calibrate_host_recovers_a_known_law() -> None:
    host = host_profile()
    models = [_matmul_model(64 * i, 128) for i in range(1, 5)] + [_conv_model(8, 16, 16)]
    samples = []
    for i, m in enumerate(models):
        roofline_s, nodes, *_ = cost_model._roofline(cost_model.analyse(m), host)
        samples.append((m, 3.0 * roofline_s * 1e3 + 0.004 * nodes, f"m{i}"))
    cal = cost_model.calibrate_host(samples, host)
    assert cal.compute_scale == pytest.approx(3.0, rel=0.02)
    assert cal.node_overhead_us == pytest.approx(4.0, rel=0.05)
    assert cal.median_abs_error_pct < 1.0
    assert [p["model"] for p in cal.points] == [f"m{i}" for i in range(5)]
    calibrated = cost_model.estimate(models[0], host, calibration=cal)
    assert calibrated.calibrated
    assert calibrated.latency_ms == pytest.approx(samples[0][1], rel=0.02)
    with pytest.raises(ValueError):
        cost_model.calibrate_host([], host)


def test_calibrate_host_uses_the_measured_input_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the default constants (the stored fit may make these tiny models memory-bound, where
    # the sequence length barely matters).
    monkeypatch.setattr(cost_model, "load_cost_fit", lambda profile=None: None)
    host = host_profile()
    shapes = {"x": [1, 4, 256]}
    models = [_matmul_model(256, 128 * i) for i in range(1, 4)]
    samples = []
    for i, m in enumerate(models):
        roofline_s, nodes, *_ = cost_model._roofline(cost_model.analyse(m, shapes), host)
        samples.append((m, 2.0 * roofline_s * 1e3 + 0.003 * nodes, f"m{i}"))
    right = cost_model.calibrate_host(samples, host, input_shapes=shapes)
    wrong = cost_model.calibrate_host(samples, host)  # dynamic dims at the defaults
    assert right.median_abs_error_pct < 1.0
    assert right.compute_scale == pytest.approx(2.0, rel=0.02)
    # seq 128 instead of 4: the fit would be far off (whatever constants this host uses)
    assert wrong.compute_scale < right.compute_scale / 2


def _law(cost: cost_model.ModelCost, profile, k: cost_model.Constants) -> float:  # type: ignore[no-untyped-def]
    roofline_s, nodes, *_ = cost_model._roofline(cost, profile, k)
    return (roofline_s + k.node_overhead_s * nodes) * 1e3


def test_fit_cpu_constants_recovers_a_known_law() -> None:
    # Latencies made by known constants (not this host's clock): the least-squares fit must
    # reproduce them, where the defaults do not.
    host = host_profile()
    # memory efficiency 0.08 of the host's bandwidth (40 GB/s a core, measured): a law in
    # which the samples below are partly memory-bound, as they are on real CPUs
    truth = cost_model.Constants(0.12, 0.08, cost_model.CACHE_BANDWIDTH_FACTOR["cpu"], 6e-6,
                                 {"ConvInteger": 0.2}, source="fitted")
    costs = ([cost_model.analyse(_matmul_model(64 * i, 256 * i)) for i in range(1, 5)]
             + [cost_model.analyse(_conv_model(8 * i, 16 * i, 16)) for i in range(1, 4)])
    samples = [(c, _law(c, host, truth), f"m{i}") for i, c in enumerate(costs)]
    fitted, points = cost_model.fit_cpu_constants(samples, host)
    assert fitted.source == "fitted" and [p["model"] for p in points] == [s[2] for s in samples]
    assert max(abs(p["error_pct"]) for p in points) < 3.0, points
    defaults = cost_model.Constants.defaults("cpu")
    assert max(abs(_law(c, host, defaults) - ms) / ms for c, ms, _ in samples) > 0.3
    with pytest.raises(ValueError):
        cost_model.fit_cpu_constants(samples[:1], host)


def test_the_fit_is_used_only_for_cpus_with_the_fitted_machines_kernels() -> None:
    from service.engine.devices.features import kernel_features

    host = host_profile()
    fit = {"machine": {"architecture": host.architecture, "threads": 2, "cpu": "test cpu",
                       "kernel_features": sorted(kernel_features(host.architecture,
                                                                 host.isa_features))},
           "constants": {"compute_efficiency": 0.1, "memory_efficiency": 0.2,
                         "cache_bandwidth_factor": 3.0, "node_overhead_s": 2e-6,
                         "reference_kernel_rate": {"ConvInteger": 0.5}},
           "date": "2026-01-01", "error": {"median_abs_pct": 9.0, "loo_median_abs_pct": 20.0}}
    k = cost_model.constants_for(host, fit)
    assert (k.source, k.compute_efficiency, k.reference_kernel_rate["ConvInteger"]) == (
        "fitted", 0.1, 0.5)
    other = host.model_copy(update={"isa_features": ("sse4_2",)})
    assert cost_model.constants_for(other, fit) == cost_model.Constants.defaults("cpu")
    # a GPU never takes a CPU fit: it gets its kind defaults, with its profile's own values
    assert cost_model.constants_for(get_device("nvidia_t4"), fit).source == "sourced"
    assert cost_model.constants_for(get_device("nvidia_l4"), fit) == \
        cost_model.Constants.defaults("gpu")


def test_of_several_stored_fits_a_cpu_takes_the_one_for_its_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # cost_fit.json keeps one fit per kind of machine (check_cost_model.py --write-fit replaces
    # the one for its own kernels): each CPU takes the fit made on its kernels, others none
    import importlib
    import sys

    from service.engine.devices.features import kernel_features

    def record(arch: str, features: tuple[str, ...], ce: float) -> dict:
        return {"machine": {"architecture": arch, "cpu": f"cpu {ce}", "threads": 1,
                            "kernel_features": sorted(kernel_features(arch, features))},
                "constants": {"compute_efficiency": ce, "memory_efficiency": 0.5,
                              "cache_bandwidth_factor": 3.0, "node_overhead_s": 1e-6},
                "date": "2026-01-01", "error": {}}

    host = host_profile()
    mine = record(host.architecture, tuple(host.isa_features), 0.7)
    other = record("arm64", ("neon", "dotprod"), 0.2)
    monkeypatch.setattr(cost_model, "load_cost_fits", lambda: (other, mine))
    assert cost_model.load_cost_fit(host) is mine and cost_model.load_cost_fit() is other
    assert cost_model.constants_for(host).compute_efficiency == 0.7
    pi = get_device("raspberry_pi_5")
    expected = other if cost_model._fit_applies(other, pi) else None
    assert cost_model.load_cost_fit(pi) is expected
    assert cost_model.load_cost_fit(get_device("nvidia_t4")) is None

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "scripts"))
    check = importlib.import_module("check_cost_model")
    newer = {**mine, "date": "2026-02-02"}
    merged = check.merge_fits([other, mine], newer)
    assert merged == [other, newer]
    assert check.merge_fits([], mine) == [mine]
    sys.modules.pop("check_cost_model", None)


def test_a_profiles_cost_constants_replace_the_kind_defaults_and_are_stated() -> None:
    a100 = get_device("nvidia_a100")
    k = cost_model.constants_for(a100)
    gpu = cost_model.Constants.defaults("gpu")
    assert k.source == "sourced"
    assert (k.compute_efficiency, k.node_overhead_s) == (
        a100.cost_constants["compute_efficiency"], a100.cost_constants["node_overhead_s"])
    assert (k.memory_efficiency, k.cache_bandwidth_factor) == (
        gpu.memory_efficiency, gpu.cache_bandwidth_factor)  # not set by the profile
    model = _conv_model(64, 64, 56)
    est = cost_model.estimate(model, a100)
    assert est.latency_ms == pytest.approx(_law(cost_model.analyse(model), a100, k))
    # a lower compute efficiency than the default makes this compute-bound conv slower
    plain = a100.model_copy(update={"cost_constants": {}})
    assert cost_model.constants_for(plain) == gpu
    assert est.latency_ms > cost_model.estimate(model, plain).latency_ms
    fits = cost_model.load_cost_sources()["fits"]
    assert est.constants == "sourced"
    assert est.fit_error_pct == fits["nvidia_a100"]["median_abs_error_pct"]
    assert any("published batch-1 latencies" in a for a in est.assumptions)
    assert cost_model.estimate(model, plain).constants == "defaults"


def test_profiles_reject_unknown_or_non_positive_cost_constants() -> None:
    a100 = get_device("nvidia_a100").model_dump()
    with pytest.raises(ValueError, match="unknown constant"):
        type(get_device("nvidia_a100")).model_validate(
            {**a100, "cost_constants": {"compute_eff": 0.3}})
    with pytest.raises(ValueError, match="must be > 0"):
        type(get_device("nvidia_a100")).model_validate(
            {**a100, "cost_constants": {"node_overhead_s": 0}})


def test_estimates_on_the_host_state_the_committed_fit_and_its_error() -> None:
    # The committed fit (scripts/check_cost_model.py --write-fit) is a real record, and an
    # estimate on a CPU it applies to says so and carries the fit's error.
    fits = cost_model.load_cost_fits()
    assert fits, "service/engine/devices/cost_fit.json is committed"
    for fit in fits:
        assert fit["error"]["samples"] >= 10 and fit["rows"] and fit["date"]
        assert all(v > 0 for k, v in fit["constants"].items() if k != "reference_kernel_rate")
        for row in fit["rows"]:
            assert row["measured_ms"] > 0 and row["fit_ms"] > 0
    kernels = [(f["machine"]["architecture"], tuple(f["machine"]["kernel_features"]))
               for f in fits]
    assert len(set(kernels)) == len(kernels), "one fit per kind of machine"
    host = host_profile()
    est = cost_model.estimate(_conv_model(8, 16, 16), host)
    k = cost_model.constants_for(host)
    assert est.latency_ms == pytest.approx(_law(cost_model.analyse(_conv_model(8, 16, 16)),
                                                host, k))
    if k.source == "fitted":  # this host runs a fitted machine's kernels
        assert est.constants == "fitted" and k.fit in fits
        assert est.fit_error_pct == k.fit["error"]["loo_median_abs_pct"]
        assert any("fitted on" in a for a in est.assumptions)
    else:  # the fallback fitted over the stored fits, with its leave-one-machine-out error
        error = cost_model.load_cpu_fallback()["error"]  # type: ignore[index]
        assert est.constants == "defaults"
        assert est.fit_error_pct == (error["leave_machine_out_median_abs_pct"]
                                     if host.architecture in error["architectures"] else None)
        assert any(a.startswith("CPU constants: the fallback") for a in est.assumptions)


def _qdq_conv_chain(extra_float_user: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv1 (DQ weight) -> Q -> DQ -> Conv2 (DQ weight) -> Q -> DQ -> y: the
    two Convs are what ONNX Runtime fuses into QLinearConv. With ``extra_float_user`` the DQ
    between the Convs also feeds an Add with a plain float input (not fusable)."""
    c, hw = 8, 16
    inits = [
        numpy_helper.from_array(np.ones((c, c, 3, 3), np.int8), "w1q"),
        numpy_helper.from_array(np.ones((c, c, 3, 3), np.int8), "w2q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w1q", "ws", "wz"], ["w1"], name="dq_w1"),
        helper.make_node("Conv", ["xd", "w1"], ["h1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("QuantizeLinear", ["h1", "s", "z"], ["h1q"], name="q_h1"),
        helper.make_node("DequantizeLinear", ["h1q", "s", "z"], ["h1d"], name="dq_h1"),
        helper.make_node("DequantizeLinear", ["w2q", "ws", "wz"], ["w2"], name="dq_w2"),
        helper.make_node("Conv", ["h1d", "w2"], ["h2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("QuantizeLinear", ["h2", "s", "z"], ["h2q"], name="q_h2"),
        helper.make_node("DequantizeLinear", ["h2q", "s", "z"], ["y"], name="dq_y"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])]
    if extra_float_user:
        nodes.append(helper.make_node("Add", ["h1d", "r"], ["side"], name="add"))
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, c, hw, hw]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    return _model(nodes, inputs, outputs, inits)


def test_a_fused_int8_kernel_reads_and_writes_int8() -> None:
    # DQ -> Conv -> Q runs as one QLinearConv: it reads the int8 activation and weight and
    # writes the int8 activation the next kernel reads; the float tensors in between exist only
    # in the graph. Counting the Conv's float output overstated int8 traffic 4x.
    act, weight = 1 * 8 * 16 * 16, 8 * 8 * 3 * 3  # elements; int8: one byte each
    cost = cost_model.analyse(_qdq_conv_chain())
    nodes = {n.name: n for n in cost.nodes}
    for conv in ("conv1", "conv2"):
        assert nodes[conv].precision == "int8"
        assert nodes[conv].weight_bytes == weight
        assert nodes[conv].bytes == act + weight + act  # int8 in, int8 weight, int8 out
    # every Q/DQ is folded except the graph's own boundary: the input Q and the output DQ
    # materialise (float in, float out) and cost what they move (with a 4-byte scale and a
    # 1-byte zero point)
    folded = {n.name for n in cost.nodes if n.fused}
    assert folded == {"dq_x", "dq_w1", "q_h1", "dq_h1", "dq_w2", "q_h2"}
    assert nodes["q_x"].bytes == act * 4 + 5 + act and nodes["dq_y"].bytes == act + 5 + act * 4


def test_a_dequantize_with_a_float_consumer_materialises_float() -> None:
    # The DQ between the Convs also feeds an Add that reads float: ONNX Runtime gives the
    # fused kernel its own copy of the DQ and runs this one, which writes the float tensor.
    act, weight = 1 * 8 * 16 * 16, 8 * 8 * 3 * 3
    cost = cost_model.analyse(_qdq_conv_chain(extra_float_user=True))
    nodes = {n.name: n for n in cost.nodes}
    assert not nodes["dq_h1"].fused and nodes["dq_h1"].bytes == act + 5 + act * 4
    assert nodes["add"].precision == "fp32" and nodes["add"].bytes == 3 * act * 4
    # the fused Conv still reads the int8 tensor
    assert nodes["conv2"].bytes == act + weight + act


def test_an_estimate_names_the_constants_that_rest_on_no_published_figure(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # every GPU and NPU default is sourced, and the CPU fallback (used where no fit on a CPU
    # with the target's kernels exists) is fitted over every stored fit (fit_cpu_fallback.py,
    # test_cpu_fallback.py): no built-in profile's estimate carries the line
    model = _conv_model(64, 64, 56)
    for profile in list_devices():
        notes = cost_model.estimate(model, profile).assumptions
        assert cost_model.assumed_constants(profile) == [], profile.name
        assert not any("rest on no published figure" in a for a in notes), profile.name
    # where a kind default is labelled ASSUMPTION, an estimate that uses it says so; a profile
    # with values of its own does not
    sources = cost_model.load_cost_sources()
    relabelled = {**sources, "constants": [
        {**r, "label": "ASSUMPTION"} if (r["constant"], r["key"]) in {
            ("MEMORY_EFFICIENCY", "npu"), ("CACHE_BANDWIDTH_FACTOR", "npu")} else r
        for r in sources["constants"]]}
    monkeypatch.setattr(cost_model, "load_cost_sources", lambda: relabelled)
    npu = get_device("intel_core_ultra_npu")
    assert cost_model.assumed_constants(npu) == [
        f"memory_efficiency = {cost_model.MEMORY_EFFICIENCY['npu']:g}",
        f"cache_bandwidth_factor = {cost_model.CACHE_BANDWIDTH_FACTOR['npu']:g}"]
    notes = cost_model.estimate(model, npu).assumptions
    assert any("rest on no published figure" in a and "memory_efficiency" in a for a in notes)
    assert cost_model.assumed_constants(get_device("nvidia_l4")) == []
    own = npu.model_copy(update={"cost_constants": {"memory_efficiency": 0.5,
                                                    "cache_bandwidth_factor": 1.5}})
    assert cost_model.assumed_constants(own) == []


def test_float32_matrix_ops_run_at_tf32_on_gpus_that_have_it() -> None:
    # cuBLAS / cuDNN / TensorRT use TF32 tensor cores for float32 convolutions by default on
    # Ampere and later: a profile listing tf32 prices them at its tf32 peak, one without (the
    # Turing T4, or the same profile with tf32 removed) at the CUDA-core fp32 peak
    jetson = get_device("jetson_orin_nano")
    assert "tf32" in jetson.precisions and jetson.peak("tf32") > jetson.peak("fp32")
    cost = cost_model.analyse(_conv_model(256, 256, 56))
    no_tf32 = jetson.model_copy(update={"precisions": tuple(
        p for p in jetson.precisions if p != "tf32")})
    terms, unsupported = cost_model._terms(cost, jetson)
    plain, _ = cost_model._terms(cost, no_tf32)
    conv = [(a, b) for a, b in zip(terms, plain, strict=True) if a.node.op_type == "Conv"]
    assert conv and not unsupported
    for with_tf32, without in conv:
        assert with_tf32.compute_s == pytest.approx(
            without.compute_s * jetson.peak("fp32") / jetson.peak("tf32"))
    fast = cost_model.estimate(_conv_model(256, 256, 56), jetson)
    assert fast.latency_ms < cost_model.estimate(_conv_model(256, 256, 56), no_tf32).latency_ms
    assert "fp32" in fast.by_precision  # still reported as the float32 it is
    assert "tf32" not in get_device("nvidia_t4").precisions
