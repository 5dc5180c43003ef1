"""Decoder LLMs (service.engine.lm): recognised, fed, evaluated as language models.

On the byte-level Llama decoder trained by ``tests.llm`` (the ``byte_lm`` fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from service.engine.dataset import load_dataset, split_feeds
from service.engine.decoder import decode_feed, decoder_spec, prefill_feed
from service.engine.errors import EngineError
from service.engine.evaluate import make_session
from service.engine.inputs import resolve_inputs
from service.engine.lm import evaluate_lm
from service.engine.search.plan import model_family


def _run(session: Any, feed: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_the_exported_lm_is_a_decoder_and_other_models_keep_their_family(byte_lm) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(byte_lm.path))
    family = model_family(model)
    assert family["family"] == "decoder"
    assert "past_key_values" in family["recognised_by"]
    spec = decoder_spec(model)
    assert spec is not None
    assert (spec.input_ids, spec.logits, spec.vocab) == ("input_ids", "logits", 256)
    assert (spec.attention_mask, spec.position_ids) == ("attention_mask", "position_ids")
    assert [(p.heads, p.head_dim) for p in spec.past] == [(2, 32)] * 6
    assert spec.past[0].output == "present.0.key"
    # Without a KV cache in the graph's interface the same weights are no decoder: the family
    # comes from the weight shares as before.
    for out in model.graph.output:
        out.name = out.name.replace("present", "kv_out")
    for node in model.graph.node:
        node.output[:] = [o.replace("present", "kv_out") for o in node.output]
    assert decoder_spec(model) is None
    assert model_family(model)["family"] == "transformer"


def test_resolved_inputs_give_a_prefill_and_a_decode_step_that_agree(byte_lm) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(byte_lm.path))
    session = make_session(byte_lm.path, 1)
    plan = resolve_inputs(model, session)
    shapes = plan.shapes()
    assert shapes["input_ids"] == [1, 64] and shapes["past_key_values.0.key"] == [1, 2, 0, 32]
    assert plan.record["decoder_steps"]["decode"]["past_key_values.2.value"] == [1, 2, 64, 32]
    feed = plan.feeds(1)[0]
    assert feed["input_ids"].max() < 256
    assert feed["position_ids"].tolist() == [list(range(64))]
    _run(session, feed)
    # KV cache on the host: prefill of L tokens + one decode step gives the logits of a
    # prefill of L + 1 tokens.
    spec = decoder_spec(model)
    assert spec is not None
    ids = byte_lm.heldout[:1, :33]
    first = _run(session, prefill_feed(spec, ids[:, :32]))
    step = _run(session, decode_feed(spec, ids[:, 32:33], first, 32))
    full = _run(session, prefill_feed(spec, ids))
    np.testing.assert_allclose(step["logits"][0, -1], full["logits"][0, -1], atol=1e-4)
    assert step["present.0.key"].shape == (1, 2, 33, 32)


def test_a_token_dataset_feeds_the_decoder(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(byte_lm.path))
    path = tmp_path / "tokens.npz"
    ids = byte_lm.heldout[:6]
    np.savez(path, input_ids=ids, labels=np.concatenate(
        [ids[:, 1:], np.full((6, 1), -100)], axis=1))
    arrays, labels = load_dataset(path, model)
    assert labels is not None and labels.shape == ids.shape
    assert arrays["attention_mask"].shape == ids.shape
    assert arrays["past_key_values.1.value"].shape == (6, 2, 0, 32)
    feeds, _ = split_feeds(model, arrays, None, 3)
    assert len(feeds) == 3 and feeds[0]["input_ids"].shape == (1, 128)
    np.savez(path, input_ids=ids + 200)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        load_dataset(path, model)


def test_evaluate_lm_compares_two_decoders(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    spec = decoder_spec(onnx.load(str(byte_lm.path)))
    assert spec is not None
    same = evaluate_lm(byte_lm.path, byte_lm.path, spec, byte_lm.heldout[:4], rounds=1,
                       decode_tokens=4, memory=False)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    assert same["top1_agreement"] == 1.0
    assert same["perplexity_before"] == same["perplexity_after"]
    # trained: far better than the uniform 256 a byte model starts at
    assert same["perplexity_before"] < 20

    quantizer = MatMulNBitsQuantizer(onnx.load(str(byte_lm.path)), block_size=128,
                                     is_symmetric=True)
    quantizer.process()
    q = tmp_path / "rtn.onnx"
    onnx.save(quantizer.model.model, str(q))
    out = evaluate_lm(byte_lm.path, q, spec, byte_lm.heldout[:4], rounds=1, decode_tokens=4)
    assert 0.0 < out["kl_divergence"] < 0.1
    assert 0.8 < out["top1_agreement"] < 1.0
    assert out["perplexity_after"] != out["perplexity_before"]
    assert out["decode_tokens_per_s_after"] > 0 and out["prefill_tokens_per_s_before"] > 0
    assert out["peak_memory_mb_before"] > out["memory"]["before"]["baseline_mb"] > 0


def _judged(constraints: dict, metrics: dict, decoder: bool) -> list[str]:
    from service.engine.constraints import parse_constraints
    from service.engine.devices import get_device
    from service.engine.search.candidate import Candidate
    from service.engine.search.score import SearchContext, violations

    cand = Candidate("int4_weight_only", [], ["int4_weight_only"], "", 0.2, 8.0)
    cand.metrics = {"bytes_stored": 1000, "target_memory_mb": 1.0, "host_speedup": 1.0,
                    "target_speedup": 1.0, "min_cosine": 0.9, "top1_agreement": None,
                    "accuracy_drop": None, **metrics}
    ctx = SearchContext(get_device("raspberry_pi_5"), parse_constraints(constraints), False,
                        decoder=decoder)
    return [v["constraint"] for v in violations(cand, ctx)]


def test_decoders_are_judged_by_kl_divergence_not_cosine() -> None:
    good, bad = {"kl_divergence": 0.001}, {"kl_divergence": 0.05}
    # a decoder: the default budget is on KLD (0.02 nats); a low logits cosine does not count
    assert _judged({"objective": "size"}, good, decoder=True) == []
    assert _judged({"objective": "size"}, bad, decoder=True) == ["max_kl_divergence"]
    assert _judged({"objective": "size", "max_kl_divergence": 0.1}, bad, decoder=True) == []
    assert _judged({"max_perplexity_increase": 0.01},
                   {**good, "perplexity_increase": 0.02}, decoder=True) == [
        "max_perplexity_increase"]
    # a missing measurement misses the budget (the LM evaluation failed)
    assert _judged({}, {"kl_divergence": None}, decoder=True) == ["max_kl_divergence"]
    # other models keep the cosine default, and cannot meet a KLD budget
    assert _judged({}, good, decoder=False) == ["min_fidelity(cosine)"]
    assert "max_kl_divergence" in _judged({"max_kl_divergence": 0.1}, good, decoder=False)
    # decode speed: a floor on the measured tokens/s, not measurable for other models
    fast = {**good, "decode_tokens_per_s": 900.0}
    assert _judged({"min_decode_tokens_per_s": 500}, fast, decoder=True) == []
    assert _judged({"min_decode_tokens_per_s": 1000}, fast, decoder=True) == [
        "min_decode_tokens_per_s"]
    assert "min_decode_tokens_per_s" in _judged({"min_decode_tokens_per_s": 1}, fast,
                                                decoder=False)


DECODER_FAMILY = {"family": "decoder", "weight_share": {"conv": 0.0, "matmul": 0.95,
                                                        "recurrent": 0.0, "other": 0.05}}


def test_auto_plans_block_128_calibrated_and_mixed_int4_for_decoders() -> None:
    from service.engine.devices import get_device
    from service.engine.registry import registered_passes
    from service.engine.search.plan import int4_size_factor, plan_candidates

    def plan(dataset: bool) -> dict[str, list[dict]]:
        cands, _ = plan_candidates(get_device("raspberry_pi_5"), DECODER_FAMILY,
                                   has_dataset=dataset, available=set(registered_passes()))
        return {c.name: c.recipe for c in cands}

    with_data, bare = plan(True), plan(False)
    assert with_data["int4_gptq_b128"] == [{"pass": "int4_weight_only", "embedding": "int8",
                                            "method": "gptq", "block_size": 128}]
    assert with_data["int4_gptq_b128_int8_10"][0]["int8_share"] == 0.1
    assert "int4_awq_b128" in with_data and "int4_hqq_b128" in with_data
    # no dynamic int8 mix for a decoder: the int4 pass takes the embedding table itself
    assert not any("int8_dynamic" in n for n in with_data if n.startswith("int4"))
    assert all(s.get("embedding") == "int8" for n, r in with_data.items()
               if n.startswith("int4") for s in r)
    # without a dataset: data-free methods only; the mixed candidate measures on generated ids
    assert not any("gptq" in n or "awq" in n for n in bare)
    assert {"int4_hqq_b128", "int4_rtn_b128_int8_10", "int4_rtn_b32"} <= set(bare)
    # size estimates: 4 bits + a 32-bit scale per block, int8 layers +4 bits, HQQ's zero points
    assert int4_size_factor(1.0, 128) == pytest.approx(4.25 / 32)
    assert int4_size_factor(1.0, 32) == pytest.approx(5 / 32)
    assert int4_size_factor(1.0, 128, int8_share=0.1) == pytest.approx(4.65 / 32)
    assert int4_size_factor(1.0, 128, zero_points=True) == pytest.approx(4.5 / 32)
    assert int4_size_factor(0.5, 128, tables_int8=True) == pytest.approx(
        0.5 * 4.25 / 32 + 0.5 * 8.25 / 32)


def test_a_decoders_pareto_front_is_in_size_decode_speed_and_kld() -> None:
    from service.engine.constraints import parse_constraints
    from service.engine.devices import get_device
    from service.engine.search.candidate import Candidate
    from service.engine.search.report import pareto_front
    from service.engine.search.score import SearchContext

    def cand(name: str, mb: float, tokens: float, kld: float) -> Candidate:
        c = Candidate(name, [], ["int4_weight_only"], "", 0.2, 8.0)
        c.status = "ok"
        c.metrics = {"size_mb": mb, "host_latency_ms": 1.0, "target_latency_ms": 1.0,
                     "min_cosine": 0.99, "accuracy_after": None, "kl_divergence": kld,
                     "perplexity_increase": 0.001, "decode_tokens_per_s": tokens,
                     "decode_tokens_per_s_original": {"a": 90.0, "b": 100.0}.get(name, 110.0)}
        return c

    cands = [cand("a", 0.5, 200.0, 0.001),   # smallest
             cand("b", 0.6, 250.0, 0.0001),  # faster and closer
             cand("c", 0.6, 240.0, 0.0002),  # dominated by b
             cand("d", 0.7, 260.0, 0.0003)]  # fastest
    ctx = SearchContext(get_device("raspberry_pi_5"), parse_constraints({}), False,
                        decoder=True)
    original = {"candidate": "original", "size_mb": 2.8, "latency_ms": 2.0,
                "fidelity": 1.0, "accuracy": None}
    front = pareto_front(cands, ctx, original)
    assert front["axes"]["front"] == "size_mb, decode_tokens_per_s, kl_divergence"
    assert front["front"] == ["a", "b", "d", "original"]
    points = {p["candidate"]: p for p in front["points"]}
    assert points["c"]["on_front"] is False and points["b"]["kl_divergence"] == 0.0001
    assert points["original"]["decode_tokens_per_s"] == 110.0  # the median of the rounds
    assert points["original"]["kl_divergence"] == 0.0
    from service.engine.report_html import render_report_html

    page = render_report_html({"auto": {"pareto_front": front}})
    assert "Decode tokens/s" in page and "<td>250</td><td>0.0001</td>" in page
    assert "<td>c</td>" not in page.split("Decode tokens/s")[1].split("</table>")[0]


def test_a_decoder_is_recognised_by_its_group_query_attention_cache() -> None:
    """Cache tensors named freely, tied to the graph by ONNX Runtime's GroupQueryAttention."""
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden, heads, kv, dim = 32, 16, 2, 1, 8
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")
    wq = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "wq")
    wkv = numpy_helper.from_array(rng.standard_normal((hidden, kv * dim)).astype(np.float32),
                                  "wkv")
    head = numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32),
                                   "head")
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wkv"], ["k"]),
        helper.make_node("MatMul", ["x", "wkv"], ["v"]),
        helper.make_node("ReduceSum", ["attention_mask"], ["total"], keepdims=0),
        helper.make_node("Cast", ["total"], ["total32"], to=TensorProto.INT32),
        helper.make_node("Sub", ["total32", "one"], ["seqlens"]),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", "cache_k", "cache_v", "seqlens",
                                                 "total32"], ["attn", "cache_k_out", "cache_v_out"],
                         domain="com.microsoft", num_heads=heads, kv_num_heads=kv),
        helper.make_node("MatMul", ["attn", "head"], ["scores"]),
    ]
    cache = ["batch", kv, "past", dim]
    graph = helper.make_graph(
        nodes, "gqa",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("cache_k", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("cache_v", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("cache_k_out", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("cache_v_out", TensorProto.FLOAT, cache)],
        [emb, wq, wkv, head, numpy_helper.from_array(np.array([1], np.int32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    spec = decoder_spec(model)
    assert spec is not None and "GroupQueryAttention" in spec.recognised_by
    assert (spec.input_ids, spec.logits, spec.vocab) == ("ids", "scores", vocab)
    assert [(p.input, p.output, p.heads, p.head_dim) for p in spec.past] == [
        ("cache_k", "cache_k_out", kv, dim), ("cache_v", "cache_v_out", kv, dim)]
    assert model_family(model)["family"] == "decoder"


def test_a_recipe_job_on_a_decoder_reports_the_lm_section(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from service.engine.recipe import run_recipe

    ids = byte_lm.heldout[:12]
    labels = np.concatenate([ids[:, 1:], np.full((12, 1), -100)], axis=1)
    np.savez(tmp_path / "tokens.npz", input_ids=ids, labels=labels)
    result = run_recipe(byte_lm.path, [{"pass": "int4_weight_only"}], tmp_path / "job",
                        dataset_path=tmp_path / "tokens.npz")
    lm = result.report["lm"]
    assert lm["source"] == "dataset" and lm["perplexity_targets"] == "labels"
    assert lm["sequences"] == result.report["evaluation"]["evaluation_samples"] == 4
    assert lm["perplexity_tokens"] == 4 * 127  # the -100 labels are not counted
    assert result.summary["lm"]["kl_divergence"] == lm["kl_divergence"] > 0
    assert result.report["accuracy"] is None  # token labels are not class labels
    assert not any("labels were given" in w for w in result.summary["warnings"])


def test_without_a_dataset_the_decoder_runs_on_the_given_prompt_length(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from service.engine.recipe import run_recipe

    result = run_recipe(byte_lm.path, [{"pass": "int4_weight_only"}], tmp_path / "job",
                        inputs={"input_ids": {"shape": [1, 24]}})
    assert result.report["eval_inputs"]["shapes"]["attention_mask"] == [1, 24]
    lm = result.report["lm"]
    assert lm["source"] == "generated" and lm["sequence_length"] == 24
    assert lm["kl_divergence"] > 0 and lm["perplexity_after"] is None  # random ids: no text


def test_mixed_int4_int8_keeps_the_layers_that_move_the_logits_most(byte_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On the trained decoder, sensitivity is each MatMul's effect on the next-token KLD: the
    LM head carries most of int4's KLD here (its relative output error is the smallest of all
    layers), so at a 10 % budget it goes int8 first, and the mix is closer to float than int4
    alone at the same block size."""
    from service.engine.registry import PassContext, get_pass

    model = onnx.load(str(byte_lm.path))
    spec = decoder_spec(model)
    np.savez(tmp_path / "tokens.npz", input_ids=byte_lm.heldout[:16])
    dataset, _ = load_dataset(tmp_path / "tokens.npz", model)
    cls = get_pass("int4_weight_only")
    kld = {}
    for share in (0.0, 0.1):
        ctx = PassContext(workdir=tmp_path, dataset=dataset)
        out = cls().run(model, cls.config_model(block_size=128, int8_share=share,
                                                accuracy_level=4), ctx)
        path = tmp_path / f"mixed_{share}.onnx"
        onnx.save(out, str(path))
        kld[share] = evaluate_lm(byte_lm.path, path, spec, byte_lm.heldout[-8:], rounds=1,
                                 decode_tokens=1, memory=False)["kl_divergence"]
        notes = ctx.notes["mixed_int8"]
    assert notes["metric"] == "kl_divergence" and notes["int8_nodes"][0] == "/model/lm_head/MatMul"
    assert max(notes["sensitivity"], key=notes["sensitivity"].__getitem__) == notes["int8_nodes"][0]
    assert 0 < notes["share_kept"] <= 0.1
    assert kld[0.1] < 0.5 * kld[0.0], kld
    # without a dataset it measures on the generated token ids the job resolved
    from service.engine.recipe import run_recipe

    result = run_recipe(byte_lm.path, [{"pass": "int4_weight_only", "block_size": 128,
                                        "int8_share": 0.1}], tmp_path / "job",
                        inputs={"input_ids": {"shape": [1, 24]}})
    mixed = result.report["passes"][0]["notes"]["mixed_int8"]
    assert "generated inputs" in mixed["measured_on"] and mixed["sensitivity"]
