"""A decoder LLM through the HTTP API: int4 recipe and auto, judged as a language model.

The byte-level Llama decoder of ``tests.llm`` (trained on the standard library's sources,
exported with its KV cache) and a dataset of held-out token sequences (``input_ids`` only).
"""

import json

import numpy as np
import pytest

from tests.e2e.client import Api

pytestmark = pytest.mark.stack

LM_KEYS = ("kl_divergence", "top1_agreement", "perplexity_before", "perplexity_after",
           "prefill_tokens_per_s_before", "prefill_tokens_per_s_after",
           "decode_tokens_per_s_before", "decode_tokens_per_s_after",
           "peak_memory_mb_before", "peak_memory_mb_after")


@pytest.fixture(scope="module")
def api(live_stack):  # type: ignore[no-untyped-def]
    return Api(live_stack.api_url)


@pytest.fixture(scope="module")
def uploaded(api, byte_lm, tmp_path_factory):  # type: ignore[no-untyped-def]
    tokens = tmp_path_factory.mktemp("lm") / "tokens.npz"
    np.savez(tokens, input_ids=byte_lm.heldout[:48])
    return api.upload_model(byte_lm.path), api.upload_dataset(tokens)


def test_int4_recipe_reports_language_model_metrics(api, uploaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, dataset = uploaded
    job = api.submit(model_id=model["id"], dataset_id=dataset["id"],
                     recipe=[{"pass": "int4_weight_only"}])
    done = api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", done.get("error")
    lm = done["result"]["lm"]
    assert all(lm[k] is not None for k in LM_KEYS), lm
    assert 0.0 < lm["kl_divergence"] < 0.05
    assert 0.85 < lm["top1_agreement"] < 1.0
    assert lm["perplexity_after"] < 1.05 * lm["perplexity_before"] < 30
    assert done["result"]["size_ratio"] > 3

    report = json.loads(api.download(done["id"], "report.json", tmp_path / "r.json").read_text())
    assert report["lm"]["source"] == "dataset"
    assert report["lm"]["perplexity_targets"] == "input_ids shifted by one"
    # held out: the 16 evaluation sequences are not among the 32 calibration ones
    assert report["lm"]["sequences"] == report["evaluation"]["evaluation_samples"] == 16
    assert report["lm"]["decoder"]["recognised_by"].startswith("past_key_values")
    html = api.download(done["id"], "report.html", tmp_path / "r.html").read_text()
    assert "Language model" in html and "decode tokens/s" in html


def test_auto_for_a_raspberry_pi_judges_the_decoder_by_kl_divergence(api, uploaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, dataset = uploaded
    job = api.submit(model_id=model["id"], dataset_id=dataset["id"], recipe="auto",
                     device="raspberry_pi_5", constraints={"objective": "size"})
    done = api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", done.get("error")
    result = done["result"]
    assert result["auto"]["candidate"].startswith("int4")
    assert 0.0 < result["lm"]["kl_divergence"] < 0.02  # the decoder's default budget
    assert result["size_ratio"] > 3
    report = json.loads(api.download(done["id"], "report.json", tmp_path / "a.json").read_text())
    # with a dataset: calibration-aware int4 at block 128 and the embedding table int8, closer
    # to float than round-to-nearest at block 32 (KLD ~0.001 on this model) and smaller
    step = report["auto"]["chosen"]["recipe"][0]
    assert step.get("method") in ("gptq", "awq"), step
    assert step["block_size"] == 128 and step["embedding"] == "int8"
    assert result["lm"]["kl_divergence"] < 0.001 and result["size_ratio"] > 5
    # the Pareto front in size, decode tokens/s and KLD, each point measured
    front = report["auto"]["pareto_front"]
    assert front["axes"]["front"] == "size_mb, decode_tokens_per_s, kl_divergence"
    assert all(p["decode_tokens_per_s"] > 0 and p["kl_divergence"] is not None
                        for p in front["points"] if p["on_front"])
    assert report["auto"]["chosen"]["candidate"] in front["front"]
