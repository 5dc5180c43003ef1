"""The benchmark scripts' verdicts (scripts/bench_*.py), without running a benchmark.

A benchmark that errors must fail (its bars and its exit code); throughput counts only jobs
that succeeded; ``--out`` writes the machine header before the tables.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import a script from scripts/ as a module (as ``python scripts/x.py`` would find its
    neighbours)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module


def _fake_model(tmp_path: Path) -> Any:
    path = tmp_path / "fake.onnx"
    path.write_bytes(b"not read: compress is replaced")
    return SimpleNamespace(name="fake", path=path, info={"exporter": "test"},
                           inputs={"x": np.zeros((2, 3), np.float32)}, labels=None)


def _summary(cosine: float) -> dict[str, Any]:
    return {"size_ratio": 2.0, "speedup": 1.2, "latency_ms_before": 1.0,
            "latency_ms_after": 0.83, "min_cosine": cosine}


def _run_bench(scripts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               compress: Any, *extra: str) -> tuple[int, Any]:
    """bench_engine.main on one fake model and one technique, with ``compress``
    replaced (the plain ORT comparison row replaced by a good one)."""
    bench = scripts("bench_engine")
    import service.engine.compress as compress_module

    model = _fake_model(tmp_path)
    monkeypatch.setattr(compress_module, "compress", compress)
    monkeypatch.setitem(bench.corpus.BUILDERS, "fake", lambda cache_dir: model)
    monkeypatch.setattr(bench, "bench_plain_ort", lambda m, w: bench._row_from_summary(
        m.name, bench.PLAIN, _summary(0.999), 0.1))
    code = bench.main(["--models", "fake", "--techniques", "fp16", "--no-auto",
                       "--cache-dir", str(tmp_path), *extra])
    return code, bench


def test_a_row_that_raises_makes_the_bench_exit_non_zero(
    scripts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the pass is broken")

    code, _ = _run_bench(scripts, tmp_path, monkeypatch, broken)
    out = capsys.readouterr().out
    assert code == 1
    # The "*" fidelity bar covers the errored row instead of dropping it.
    assert "ERROR  fake" in out and "fidelity cosine >= 0.99" in out
    assert "RuntimeError: the pass is broken" in out


def test_a_row_that_passes_its_bars_exits_zero_and_out_has_the_machine_header(
    scripts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def works(*args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(summary=_summary(0.999))

    out_file = tmp_path / "docs" / "bench" / "engine.txt"
    code, _ = _run_bench(scripts, tmp_path, monkeypatch, works, "--out", str(out_file))
    assert code == 0
    text = out_file.read_text()
    header = [line for line in text.splitlines() if line.startswith("# ")]
    keys = [line[2:].split(":", 1)[0] for line in header]
    assert keys[:6] == ["command", "date", "commit", "cpu", "cores", "threads"]
    assert "latency at 1 intra-op thread" in text
    assert "== fake" in text and "PASS   fake" in text  # the tables follow the header
    assert "1/1 bars passed, 0 did not apply" in text and text.rstrip().endswith("exit 0")
    assert "# command" not in capsys.readouterr().out  # the header goes to the file only


def test_a_row_that_misses_its_bar_exits_non_zero(
    scripts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _ = _run_bench(scripts, tmp_path, monkeypatch,
                         lambda *a, **k: SimpleNamespace(summary=_summary(0.9)))
    assert code == 1


def test_bar_verdicts(scripts: Any) -> None:
    bench = scripts("bench_engine")
    good = bench.Row("digits_cnn", "quantize_static", size_ratio=4.0, speedup=1.6,
                     min_cosine=0.999, accuracy_delta=0.0)
    errored = bench.Row("lstm_model", "quantize_dynamic", error="pass_failed: boom")
    unjudgeable = bench.Row("gru_model", "quantize_dynamic", size_ratio=None, min_cosine=0.999)
    plain = bench.Row("lstm_model", bench.PLAIN, error="the plain call may fail")
    results = bench.check_bars([good, errored, unjudgeable, plain])
    by = {(r.model, r.what): r.status for r in results}
    assert by[("digits_cnn", "static int8 >= 1.5x (aim)")] == "PASS"
    assert by[("lstm_model", "int8 >= 3.7x smaller")] == "ERROR"
    assert by[("lstm_model", "fidelity cosine >= 0.99")] == "ERROR"  # a "*" bar keeps errors
    assert by[("gru_model", "int8 >= 3.7x smaller")] == "ERROR"  # None is not a pass
    assert all(r.technique != bench.PLAIN for r in results)  # a comparison, not judged
    assert bench.exit_code([r for r in results if r.model == "digits_cnn"]) == 0
    assert bench.exit_code(results) == 1


def test_an_errored_row_no_bar_covers_still_fails(scripts: Any) -> None:
    bench = scripts("bench_engine")
    rows = [bench.Row("fake", "auto", error="pass_failed: boom")]
    results = bench.check_bars(rows, bars=[])
    assert [(r.status, r.what) for r in results] == [("ERROR", "runs without error")]
    assert bench.exit_code(results) == 1


def test_training_bars_count_errored_and_missing_rows(scripts: Any) -> None:
    bench = scripts("bench_engine")
    rows = [bench.TrainingRow("cluster16", size_ratio=7.0),
            bench.TrainingRow("prune_channels50+distill", error="pass_failed: boom"),
            bench.TrainingRow("quantize_aware_training", error="timeout")]
    results = bench.check_training_bars(rows)
    status = {(r.technique, r.what): r.status for r in results}
    assert status[("cluster16", "file >= 6x smaller")] == "PASS"
    assert status[("prune_channels50+distill", ">= 1.5x fewer FLOPs")] == "ERROR"
    assert status[("prune_magnitude80+int8", "zstd artifact >= 8x smaller than float")] == "ERROR"
    assert status[("quantize_aware_training", "runs without error")] == "ERROR"
    assert bench.exit_code(results) == 1


def test_scaleout_throughput_counts_succeeded_jobs_only(scripts: Any) -> None:
    scaleout = scripts("bench_scaleout")
    finished = {"a": ("succeeded", 10.0), "b": ("succeeded", 20.0), "c": ("failed", 1.0),
                "d": ("cancelled", 1.0)}
    row = scaleout.tally(workers=2, jobs=5, finished=finished, seconds=60.0)
    assert row["jobs_per_min"] == pytest.approx(2.0)  # 2 succeeded in a minute, not 4
    assert (row["succeeded"], row["failed"], row["cancelled"], row["unfinished"]) == (2, 1, 1, 1)
    assert row["median_finish_s"] == pytest.approx(15.0)  # of the succeeded jobs


def test_scaleout_exits_non_zero_when_a_job_did_not_succeed(
    scripts: Any, capsys: pytest.CaptureFixture
) -> None:
    scaleout = scripts("bench_scaleout")
    ok = scaleout.tally(1, 2, {"a": ("succeeded", 5.0), "b": ("succeeded", 9.0)}, 10.0)
    assert scaleout.report([ok]) == 0
    failing = scaleout.tally(3, 2, {"a": ("succeeded", 2.0), "b": ("failed", 1.0)}, 10.0)
    assert scaleout.report([ok, failing]) == 1
    out = capsys.readouterr().out
    assert "1 job(s) did not succeed" in out
    none = scaleout.tally(1, 1, {"a": ("failed", 1.0)}, 10.0)
    assert scaleout.report([none, ok]) == 1  # no zero division when nothing succeeded


def test_header_names_the_machine(scripts: Any) -> None:
    import datetime as dt

    output = scripts("bench_output")
    header = output.machine_header("scripts/x.py", ["--a", "1"], threads="2 workers",
                                   now=dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.UTC))
    lines = header.splitlines()
    assert lines[0] == "# command: scripts/x.py --a 1"
    assert lines[1] == "# date: 2025-01-02 03:04 UTC"
    assert lines[2].startswith("# commit: ") and "unknown" not in lines[2]
    assert lines[3].startswith("# cpu: ") and "kernel flags:" in lines[3]
    assert lines[5] == "# threads: 2 workers"
    if sys.platform == "linux":
        assert "cores: " in lines[4] and "usable" in lines[4]


def test_a_precise_refusal_does_not_fail_a_bar_over_every_technique(scripts: Any) -> None:
    """int4 on a CNN is refused with no_effect: a bar on every technique does not apply to it,
    a bar naming the technique still fails, and an unexpected error always fails."""
    bench = scripts("bench_engine")
    refused = bench.Row("digits_cnn", "int4_weight_only", error="no_effect: no MatMul/Gemm")
    good = bench.Row("digits_cnn", "quantize_static", size_ratio=3.8, speedup=2.0,
                     min_cosine=0.999)
    wildcard = [("*", "*", "cosine >= 0.99", lambda r: r.min_cosine >= 0.99)]
    results = bench.check_bars([refused, good], wildcard)
    assert [r.status for r in results] == ["REFUSED", "PASS"]
    assert bench.exit_code(results) == 0
    named = [("digits_cnn", "int4_weight_only", "int4 >= 6x", lambda r: r.size_ratio >= 6)]
    assert bench.exit_code(bench.check_bars([refused], named)) == 1
    broken = bench.Row("digits_cnn", "fp16", error="pass_failed: boom")
    assert bench.exit_code(bench.check_bars([broken, good], wildcard)) == 1


def test_bench_real_inputs_are_real_and_disjoint(scripts: Any) -> None:
    """bench_real's evaluation inputs never repeat its calibration inputs: different
    sentences, different photos, different files; images are rendered, not noise."""
    from tests import real_inputs as bench  # the inputs bench_real and the wheel tests share

    assert scripts("bench_real").wheel_models is bench.wheel_models
    assert not set(bench.SENTENCES_CAL) & set(bench.SENTENCES_EVAL)
    lines = bench.text_lines(bench.SENTENCES_CAL[:2], 48, 192, 0)
    assert lines.shape == (2, 48, 192, 3) and lines.dtype == np.uint8
    assert (lines < 100).mean() > 0.01  # dark text on a light background
    china = bench.photo_crops("china.jpg", 2, 64, 0)
    flower = bench.photo_crops("flower.jpg", 2, 64, 0)
    assert china.shape == (2, 64, 64, 3) and not np.array_equal(china, flower)
    ids, mask = bench.token_ids(["a b c", "a"], 100, 4)
    assert ids[0, 0] == ids[1, 0] != 0 and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_bench_llm_wide_model_has_the_documented_dims(scripts: Any) -> None:
    """bench_llm's ``--model wide`` (tests.llm.SIZES) is the LM its docstring describes: 4
    layers, hidden 512, intermediate 1024, 8 / 4 KV heads, 9.70 M parameters (38.8 MB float32),
    cached under its own name; the tests' small model is unchanged. Counted on torch's meta
    device: nothing is allocated or trained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import llm

    assert scripts("bench_llm").llm is llm
    wide, small = llm.SIZES["wide"], llm.SIZES["small"]
    assert {k: wide.config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                        "num_attention_heads", "num_key_value_heads")} == {
        "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1024,
        "num_attention_heads": 8, "num_key_value_heads": 4}
    assert small.config is llm.CONFIG and small.name == llm.NAME == "byte_llama"
    assert (small.steps, small.batch, small.learning_rate) == (160, 16, 3e-3)
    assert wide.name != small.name and (wide.steps, wide.batch) == (300, 16)

    def parameters(config: dict[str, Any]) -> int:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**config))
        return sum(p.numel() for p in model.parameters())

    assert round(parameters(wide.config) / 1e6, 2) == 9.70
    assert round(parameters(wide.config) * 4 / 1e6, 1) == 38.8
    assert "9.70 M parameters, 38.8 MB float32 (a 39.0 MB file)" in (llm.__doc__ or "")
    assert round(parameters(small.config) * 4 / 1e6, 2) == 2.63  # + graph: the 2.76 MB file
