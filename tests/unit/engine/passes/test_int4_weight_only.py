"""int4_weight_only: MatMulNBits with configurable blocks, Gemm and subgraphs reached; HQQ, GPTQ
and AWQ against RTN on held-out digits; embedding and LM head precisions; accuracy level."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.passes.int4_weight_only import Int4WeightOnlyConfig
from service.engine.passes.quantize_static import QuantizeStaticConfig
from service.engine.registry import get_pass
from tests import crafted
from tests.models import digits_mlp


def test_block_size_must_be_a_power_of_two_in_range() -> None:
    for ok in (16, 32, 64, 128, 256):
        assert Int4WeightOnlyConfig(block_size=ok).block_size == ok
    for bad in (8, 48, 100, 512):
        with pytest.raises(ValueError):
            Int4WeightOnlyConfig(block_size=bad)
    config = Int4WeightOnlyConfig(block_size=128, symmetric=False, accuracy_level=1)
    assert Int4WeightOnlyConfig.model_validate_json(config.model_dump_json()) == config


def test_transformer_is_6x_smaller(kit, transformer) -> None:
    model = kit.load(transformer)
    run = kit.run("int4_weight_only", model)
    assert run.notes["quantized"] == 16
    assert kit.ops(run.model).get("com.microsoft.MatMulNBits") == 16
    assert kit.ratio(model, run.model) >= 6.0
    feeds = {k: v[:2] for k, v in transformer.inputs.items()}
    assert kit.min_cosine(kit.outputs(model, feeds), kit.outputs(run.model, feeds)) >= 0.99


def test_block_size_and_symmetry_trade_size(kit) -> None:
    model = kit.load(crafted.mlp())
    sizes = {
        (b, s): kit.run("int4_weight_only", model, block_size=b, symmetric=s).model.ByteSize()
        for b, s in ((32, True), (128, True), (32, False))
    }
    assert sizes[(128, True)] < sizes[(32, True)] < sizes[(32, False)]


def test_gemm_and_subgraph_matmuls_are_reached(kit) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (256, 128)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
        "gemm",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 128])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 256])],
        [nh.from_array(w, "w")],
    )
    gemm = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    run = kit.run("int4_weight_only", kit.load(gemm))
    assert run.notes["gemm_as_matmul"] == ["fc"]
    assert run.notes["quantized"] == 1
    x = rng.normal(0, 1, (4, 128)).astype(np.float32)
    assert kit.min_cosine(kit.outputs(gemm, {"x": x}), kit.outputs(run.model, {"x": x})) >= 0.99

    branches = kit.load(crafted.if_branch_weights())
    run = kit.run("int4_weight_only", branches)
    assert run.notes["quantized"] == 2  # one MatMul in each If branch
    assert kit.ratio(branches, run.model) >= 4.0


def test_models_without_matmul_weights_are_refused(kit, lstm) -> None:
    with pytest.raises(EngineError) as info:
        kit.run("int4_weight_only", kit.load(lstm))
    assert info.value.code == "no_effect"
    assert "LSTM" in info.value.message
    with pytest.raises(EngineError) as info:
        kit.run("int4_weight_only", kit.load(crafted.mlp()), nodes_to_exclude=["fc1", "fc2", "fc3"])
    assert info.value.code == "no_effect"


# ---- calibration-aware methods, tables, accuracy level


@pytest.fixture(scope="module")
def digits() -> tuple:
    """A trained digits MLP, its training rows (calibration) and its test rows (held out)."""
    return digits_mlp()


def _kld(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-10) - np.log(q + 1e-10)), axis=1)))


@pytest.mark.parametrize("block_size", [32, 128])
def test_hqq_gptq_awq_beat_rtn_on_heldout_kld(kit, digits, block_size) -> None:
    model, x_cal, x_test = digits
    reference = kit.outputs(model, {"x": x_test})[0]
    kld = {}
    for method in ("rtn", "hqq", "gptq", "awq"):
        run = kit.run("int4_weight_only", kit.load(model), dataset={"x": x_cal}, method=method,
                      block_size=block_size, min_elements=1024, calibration_samples=512)
        assert run.notes["quantized"] == 3 and run.notes["method"] == method
        kld[method] = _kld(reference, kit.outputs(run.model, {"x": x_test})[0])
    assert kld["rtn"] > 0, kld  # int4 error is visible on this model
    for method in ("hqq", "gptq", "awq"):
        assert kld[method] < kld["rtn"], (block_size, kld)
    assert run.notes["calibration"] == {"source": "dataset", "samples": 512, "method": "awq"}


def test_gptq_and_awq_need_a_dataset(kit, digits) -> None:
    for method in ("gptq", "awq"):
        with pytest.raises(EngineError) as info:
            kit.run("int4_weight_only", kit.load(digits[0]), method=method, min_elements=1024)
        assert info.value.code == "invalid_dataset"
        assert repr(method) in info.value.message and "dataset" in info.value.message
    cls = get_pass("int4_weight_only")
    assert [cls.calibrates_with(Int4WeightOnlyConfig(method=m))
            for m in ("rtn", "hqq", "gptq", "awq")] == [False, False, True, True]
    assert get_pass("quantize_static").calibrates_with(QuantizeStaticConfig())


def _tiny_lm() -> onnx.ModelProto:
    """ids -> Gather(table [1024, 64]) -> MatMul 64x256 -> Relu -> MatMul 256x1024 -> logits."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(0, 1, (1024, 64)).astype(np.float32), "table"),
             nh.from_array(rng.normal(0, 0.1, (64, 256)).astype(np.float32), "w_in"),
             nh.from_array(rng.normal(0, 0.1, (256, 1024)).astype(np.float32), "w_head")]
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "w_in"], ["m"], name="fc"),
             h.make_node("Relu", ["m"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w_head"], ["logits"], name="lm_head")]
    g = h.make_graph(nodes, "lm", [h.make_tensor_value_info("ids", T.INT64, ["B", "S"])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["B", "S", 1024])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_embedding_and_lm_head_precisions(kit) -> None:
    model = kit.load(_tiny_lm())
    ids = {"ids": np.array([[0, 5, 1023, 7]], np.int64)}
    reference = kit.outputs(model, ids)
    sizes = {}
    for embedding, lm_head, op in (("float", "int4", None),
                                   ("int4", "int4", "com.microsoft.GatherBlockQuantized"),
                                   ("int8", "float", "DequantizeLinear"),
                                   ("float", "int8", "DequantizeLinear")):
        run = kit.run("int4_weight_only", model, embedding=embedding, lm_head=lm_head,
                      block_size=32)
        ops = kit.ops(run.model)
        assert run.notes["lm_head"]["nodes"] == ["lm_head"]
        assert ops.get("com.microsoft.MatMulNBits") == (2 if lm_head == "int4" else 1)
        assert op is None or ops.get(op) == 1, ops
        assert kit.min_cosine(reference, kit.outputs(run.model, ids)) >= 0.98
        sizes[embedding, lm_head] = run.model.ByteSize()
    table = 1024 * 64 * 4  # float32 embedding bytes
    assert sizes["float", "int4"] - sizes["int4", "int4"] > 0.8 * table  # int4 table: ~1/7
    assert sizes["float", "int4"] < sizes["float", "int8"] < model.ByteSize()
    assert max(sizes.values()) < model.ByteSize()


def test_accuracy_level_follows_the_target(tmp_path) -> None:
    from service.engine.devices import get_device
    from service.engine.passes.int4_weight_only import choose_accuracy_level
    from service.engine.registry import PassContext

    chosen = {name: choose_accuracy_level(Int4WeightOnlyConfig(),
                                          PassContext(tmp_path, target=get_device(name)))[0]
              for name in ("x86_xeon_spr_vnni_amx", "x86_laptop_avx2", "raspberry_pi_5",
                           "raspberry_pi_4")}
    assert chosen == {"x86_xeon_spr_vnni_amx": 4, "x86_laptop_avx2": None,
                      "raspberry_pi_5": 4, "raspberry_pi_4": None}
    explicit = Int4WeightOnlyConfig(accuracy_level=1)
    assert choose_accuracy_level(explicit, PassContext(tmp_path))[0] == 1


def test_hqq_zero_points_are_rewritten_exactly_for_the_fast_kernel(kit) -> None:
    """HQQ's float zero points become a correction term: same outputs as ONNX Runtime's HQQ
    model, and no MatMulNBits left with a float zero point."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = kit.load(crafted.mlp())
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(plain, bits=4, block_size=32,
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=32))
    quantizer.process()
    run = kit.run("int4_weight_only", model, method="hqq", block_size=32, accuracy_level=1)
    assert run.notes["hqq_zero_point_corrections"] == 3 and run.notes["quantized"] == 3
    assert all(len(n.input) == 3 for n in run.model.graph.node if n.op_type == "MatMulNBits")
    x = {"x": np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)}
    expected = kit.outputs(quantizer.model.model, x)[0]
    assert np.abs(kit.outputs(run.model, x)[0] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_layer_sensitivity_is_the_output_change_of_each_layer_alone(kit, digits) -> None:
    """The gated probe (one session, one gate per layer) measures what quantizing that layer
    alone does to the output: checked against a model with that one weight replaced."""
    from service.engine.passes.int4_weight_only import layer_sensitivity, rtn_int4

    model, x_cal, _ = digits
    model = kit.load(model)
    layers = [(n.name, n.input[1]) for n in model.graph.node if n.op_type == "MatMul"]
    feeds = [{"x": x_cal[:64]}, {"x": x_cal[64:128]}]
    sens, metric = layer_sensitivity(model, layers, feeds, 32, True)
    assert metric == "relative_squared_error" and set(sens) == {n for n, _ in layers}
    for name, weight in layers:
        one = onnx.ModelProto()
        one.CopyFrom(model)
        for t in one.graph.initializer:
            if t.name == weight:
                t.CopyFrom(nh.from_array(rtn_int4(nh.to_array(t), 32, True), weight))
        expected = 0.0
        for feed in feeds:
            a, b = kit.outputs(model, feed)[0], kit.outputs(one, feed)[0]
            expected += float(np.sum((b - a) ** 2) / np.sum(a ** 2)) / len(feeds)
        assert sens[name] == pytest.approx(expected, rel=1e-3, abs=1e-12), name


def test_int8_share_keeps_the_most_sensitive_layers_at_8_bits(kit, digits) -> None:
    model, x_cal, x_test = digits
    model = kit.load(model)
    reference = kit.outputs(model, {"x": x_test})[0]
    options = {"dataset": {"x": x_cal}, "block_size": 128, "min_elements": 1024,
               "accuracy_level": 4}
    plain = kit.run("int4_weight_only", model, **options)
    sizes = {n.input[1]: int(np.prod(next(t.dims for t in model.graph.initializer
                                          if t.name == n.input[1])))
             for n in model.graph.node if n.op_type == "MatMul"}
    share = 0.5
    mixed = kit.run("int4_weight_only", model, int8_share=share, **options)
    notes = mixed.notes["mixed_int8"]
    eight = [n for n in mixed.model.graph.node if n.op_type == "MatMulNBits"
             and next(a.i for a in n.attribute if a.name == "bits") == 8]
    assert sorted(n.name for n in eight) == sorted(f"{m}_Q8" for m in notes["int8_nodes"])
    assert eight
    assert mixed.notes["quantized"] == plain.notes["quantized"] == 3
    assert 0 < notes["share_kept"] <= share and notes["metric"] == "relative_squared_error"
    # the greedy order is sensitivity per weight: the first one kept is the densest
    weights = {n.name: sizes[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"}
    density = {k: v / weights[k] for k, v in notes["sensitivity"].items()}
    assert notes["int8_nodes"][0] == max(density, key=density.__getitem__)
    kld = {name: _kld(reference, kit.outputs(run.model, {"x": x_test})[0])
           for name, run in (("int4", plain), ("mixed", mixed))}
    assert kld["mixed"] < kld["int4"], kld
    assert plain.model.ByteSize() < mixed.model.ByteSize() < model.ByteSize()
    # without int8 compute the 8-bit kernel is slow: the same layers stay float instead
    slow = kit.run("int4_weight_only", model, int8_share=share, **{**options,
                                                                   "accuracy_level": 1})
    assert slow.notes["mixed_int8"]["float_nodes"] == notes["int8_nodes"]
    assert kit.ops(slow.model)["com.microsoft.MatMulNBits"] == 3 - len(notes["int8_nodes"])
    assert get_pass("int4_weight_only").calibrates_with(Int4WeightOnlyConfig(int8_share=0.1))
    with pytest.raises(EngineError) as info:
        kit.run("int4_weight_only", model, int8_share=share, min_elements=1024)
    assert info.value.code == "invalid_dataset"


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clipping_never_rounds_worse_than_rtn_on_its_rows(symmetric: bool) -> None:
    """Ratio 1.0 (plain RTN) is on the clipping grid: on the rows it searched, every block's
    output error (``x_b (w_b - Q(w_b))``, per output column) is at most RTN's; blocks with an
    outlier weight get a shrunk range, and the error summed over blocks falls."""
    from service.engine.passes.int4_weight_only import clipped_int4, rtn_int4
    from service.engine.weight_stream import pack_nbits

    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    w[5, :8] = 12.0  # outliers the RTN range stretches to
    codes, scales, zeros, mean_ratio = clipped_int4(x, w, 32, symmetric)
    zero = np.repeat(zeros if zeros is not None else np.full_like(scales, 8.0), 32, axis=0)
    dequant = (codes.astype(np.float32) - zero[:128]) * np.repeat(scales, 32, axis=0)[:128]
    rtn = rtn_int4(w, 32, symmetric)
    blocks = [slice(b, b + 32) for b in range(0, 128, 32)]
    clipped_err = np.array([((x[:, b] @ (w[b] - dequant[b])) ** 2).sum(axis=0) for b in blocks])
    rtn_err = np.array([((x[:, b] @ (w[b] - rtn[b])) ** 2).sum(axis=0) for b in blocks])
    assert np.all(clipped_err <= rtn_err * (1 + 1e-4) + 1e-3)
    assert clipped_err.sum() < 0.97 * rtn_err.sum() and mean_ratio < 1.0
    packed, _, zp = pack_nbits(codes, scales, zeros, 32)  # packs as MatMulNBits reads it
    assert packed.shape == (48, 4, 16) and (zp is None) == symmetric
