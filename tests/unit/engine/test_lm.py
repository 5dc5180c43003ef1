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
