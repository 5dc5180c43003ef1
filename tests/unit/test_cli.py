"""The ``edgepress`` CLI: argument parsing, output formats and exit codes.

Parsing and exit-code rules run in-process without a server; commands that talk to the API run
against the real local stack (``@pytest.mark.stack``).
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service import cli
from service.cli import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNMET,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    ProgressView,
    job_exit_code,
    main,
    parse_dynamic,
    parse_pass,
    parse_recipe_arg,
    parse_shape,
    parse_value,
    summarize_report,
    unmet_constraints,
)
from service.devstack import free_port
from service.jobs.record import Job, JobError, JobState


def _job(**over: Any) -> Job:
    base = Job(id="job_1", model_id="mdl_" + "0" * 32, device="host",
               recipe=[{"pass": "quantize_dynamic"}], created_at=datetime.now(UTC))
    return base.model_copy(update=over)


RESULT = {"bytes_before": 4_000_000, "bytes_after": 1_000_000, "bytes_after_zstd": None,
          "size_ratio": 4.0, "latency_ms_before": 2.0, "latency_ms_after": 1.5,
          "speedup": 1.33, "min_cosine": 0.995, "accuracy_before": 0.9,
          "accuracy_after": 0.88, "warnings": []}


# ---------------------------------------------------------------------------------------------
# Parsing


def test_pass_specs_parse_to_recipe_steps() -> None:
    assert parse_pass("quantize_dynamic") == {"pass": "quantize_dynamic"}
    assert parse_pass("quantize_static:per_channel=true,calibration=entropy,samples=64") == {
        "pass": "quantize_static", "per_channel": True, "calibration": "entropy", "samples": 64}
    assert parse_pass("quantize_dynamic:op_types=[MatMul,Gemm],min_elements=1024") == {
        "pass": "quantize_dynamic", "op_types": ["MatMul", "Gemm"], "min_elements": 1024}
    assert parse_pass('prune_magnitude:sparsity=0.5,op_types=["Conv"]')["op_types"] == ["Conv"]
    for bad in (":x=1", "quantize_static:per_channel", "p:=3"):
        with pytest.raises(CliError) as info:
            parse_pass(bad)
        assert info.value.exit_code == EXIT_USAGE


def test_recipe_argument_is_json_auto_or_a_file(tmp_path: Path) -> None:
    steps = [{"pass": "fp16"}]
    assert parse_recipe_arg(json.dumps(steps)) == steps
    assert parse_recipe_arg("auto") == "auto"
    file = tmp_path / "recipe.json"
    file.write_text(json.dumps({"recipe": steps}))
    assert parse_recipe_arg(f"@{file}") == steps
    for bad in ("{not json", '{"pass": "fp16"}', "[1, 2]"):
        with pytest.raises(CliError) as info:
            parse_recipe_arg(bad)
        assert info.value.exit_code == EXIT_USAGE


def test_shapes_and_dynamic_axes() -> None:
    assert parse_shape("image=1x3x224x224") == ("image", [1, 3, 224, 224])
    assert parse_dynamic("tokens=0:batch,1:seq") == ("tokens", {0: "batch", 1: "seq"})
    assert parse_dynamic("x=0") == ("x", {0: "x_dim0"})
    for bad in ("image", "image=1xAx3", "image=0x3"):
        with pytest.raises(CliError):
            parse_shape(bad)
    with pytest.raises(CliError):
        parse_dynamic("x=batch:0")
    assert parse_value("sr=16000") == ("sr", 16000)
    assert parse_value("scale=0.5") == ("scale", 0.5) and parse_value("f=true") == ("f", True)
    for bad in ("sr", "=1", "sr=fast"):
        with pytest.raises(CliError):
            parse_value(bad)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["submit"])  # the model is required
    assert info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == EXIT_USAGE
    # Two recipe sources at once is refused before any network call.
    assert main(["--api", f"http://127.0.0.1:{free_port()}", "submit", "mdl_x", "--auto",
                 "--pass", "fp16"]) == EXIT_USAGE
    assert "exactly one of" in capsys.readouterr().err
    # A constraint the API's schema refuses is a usage error, found by the client first.
    assert main(["--api", f"http://127.0.0.1:{free_port()}", "submit", "mdl_x", "--auto",
                 "--min-fidelity", "3"]) == EXIT_USAGE
    assert main(["--api", f"http://127.0.0.1:{free_port()}", "submit", "mdl_x", "--auto",
                 "--input-shape", "image=1x3x640", "--input-value", "sr=x"]) == EXIT_USAGE


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["wait", "--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "constraints" in text and "7  wait timed out" in text


def test_global_options_work_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    a = cli._finish_args(parser.parse_args(["--json", "--api", "http://a:1", "list"]))
    b = cli._finish_args(parser.parse_args(["list", "--json", "--api", "http://a:1"]))
    assert (a.json, a.api) == (b.json, b.api) == (True, "http://a:1")


def test_api_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRESS_API_URL", "http://example.invalid:9")
    args = cli._finish_args(cli.build_parser().parse_args(["list"]))
    assert args.api == "http://example.invalid:9" and args.json is False


def test_unreachable_api_exits_6_with_a_json_problem(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--json", "--retries", "0", "--api", f"http://127.0.0.1:{free_port()}",
                 "status", "job_1"])
    assert code == EXIT_UNREACHABLE
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["code"] == "connection_error"


# ---------------------------------------------------------------------------------------------
# Exit codes of a finished job


def test_exit_codes_of_finished_jobs() -> None:
    ok = _job(state=JobState.succeeded, result=RESULT, constraints={"min_fidelity": 0.99})
    assert job_exit_code(ok) == EXIT_OK and unmet_constraints(ok) == []
    big = _job(state=JobState.succeeded, result=RESULT, constraints={"max_size_mb": 0.5})
    assert job_exit_code(big) == EXIT_UNMET
    assert unmet_constraints(big) == ["max_size_mb: 1.0000 > 0.5"]
    drop = _job(state=JobState.succeeded, result=RESULT, constraints={"max_accuracy_drop": 0.01})
    assert job_exit_code(drop) == EXIT_UNMET
    slow = _job(state=JobState.succeeded, result=RESULT,
                constraints={"max_latency_ms": 1.0, "latency_on": "host"})
    assert unmet_constraints(slow) == ["max_latency_ms (host): 1.5000 > 1.0"]
    lm = _job(state=JobState.succeeded, result={**RESULT, "lm": {"kl_divergence": 0.03}},
              constraints={"max_kl_divergence": 0.02, "max_perplexity_increase": 0.05})
    assert unmet_constraints(lm) == ["max_kl_divergence: 0.03000 > 0.02",
                                     "max_perplexity_increase: not measured (not a decoder LLM)"]
    # A target latency is the auto search's business (it fails the job instead).
    target = _job(state=JobState.succeeded, result=RESULT, constraints={"max_latency_ms": 1.0})
    assert job_exit_code(target) == EXIT_OK
    unsat = _job(state=JobState.failed, error=JobError(code="constraints_unsatisfiable",
                                                       message="closest misses size"))
    assert job_exit_code(unsat) == EXIT_UNMET
    failed = _job(state=JobState.failed, error=JobError(code="pass_failed", message="x"))
    assert job_exit_code(failed) == EXIT_FAILED
    assert job_exit_code(_job(state=JobState.cancelled)) == EXIT_CANCELLED


# ---------------------------------------------------------------------------------------------
# Output


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_tty_and_lines_otherwise() -> None:
    tty = _Tty()
    view = ProgressView(tty)
    view(_job(state=JobState.running, stage="pass:quantize_static", progress=0.5))
    view(_job(state=JobState.succeeded, stage="succeeded", progress=1.0))
    text = tty.getvalue()
    assert text.startswith("\r[") and "50.0%" in text and "pass:quantize_static" in text
    assert "#" * 28 in text and text.endswith("\n")

    plain = io.StringIO()
    view = ProgressView(plain)
    running = _job(state=JobState.running, stage="evaluate", progress=0.75)
    view(running)
    view(running)  # unchanged: not repeated
    view(_job(state=JobState.succeeded, stage="succeeded", progress=1.0))
    assert plain.getvalue().splitlines() == ["job_1 running evaluate 75.0%",
                                             "job_1 succeeded succeeded 100.0%"]
    assert "\r" not in plain.getvalue()


def test_report_summary_of_an_auto_report() -> None:
    report = {
        # The summary's head-to-head numbers, not the first measurement in "latency".
        "summary": {"min_cosine": 0.996, "speedup": 2.0, "latency_ms_before": 1.0,
                    "latency_ms_after": 0.5},
        "size": {"bytes_before": 2_000_000, "bytes_after": 500_000, "ratio": 4.0},
        "latency": {"before_ms": 1.1, "after_ms": 0.8, "speedup": 1.37},
        "passes": [{"pass": "quantize_static"}], "device": {"name": "raspberry_pi_5"},
        "auto": {"target_measured": False,
                 "chosen": {"candidate": "int8_u8s8", "why": "smallest that fits",
                            "target_estimate": {"device": "raspberry_pi_5", "latency_ms": 3.2,
                                                "peak_memory_mb": 1.1, "energy_mj": 20}},
                 "pareto_front": {"front": ["original", "int8_u8s8"]}},
        "fidelity": {"y": {"cosine": 0.996, "sqnr_db": 25.0}},
        "warnings": ["latency on raspberry_pi_5 is estimated"],
    }
    rows = dict(summarize_report(report))
    assert rows["mode"] == "auto" and rows["chosen"] == "int8_u8s8"
    assert "4.00x smaller" in rows["size"]
    assert rows["latency (host)"] == "1.0000 -> 0.5000 ms (2.00x: 2.00x faster)"
    assert rows["estimate on raspberry_pi_5"].startswith("3.2 ms")
    assert rows["warning"] == "latency on raspberry_pi_5 is estimated"


def test_report_of_a_local_file_in_both_formats(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    report = {"size": {"bytes_before": 10, "bytes_after": 5, "ratio": 2.0},
              "latency": {}, "passes": [{"pass": "fp16"}], "summary": {}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["report", str(path)]) == EXIT_OK
    assert "2.00x smaller" in capsys.readouterr().out
    assert main(["report", str(path), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == report


# ---------------------------------------------------------------------------------------------
# Against the real stack


@pytest.mark.stack
def test_devices_table_and_json(live_stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api", live_stack.api_url, "devices"]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "KIND", "ARCH"]
    assert any(line.startswith("raspberry_pi_5 ") for line in table)
    assert main(["--api", live_stack.api_url, "devices", "host", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["name"] == "host"


@pytest.mark.stack
def test_unknown_job_exits_5_with_the_problem(live_stack: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api", live_stack.api_url, "--json", "status", "job_nope"]) == EXIT_REFUSED
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "job_not_found"
    assert "job_not_found" in captured.err


@pytest.mark.stack
def test_upload_refuses_a_pickle_with_exit_5(live_stack: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04\x95pickled")
    assert main(["--api", live_stack.api_url, "upload", str(bad)]) == EXIT_REFUSED
    assert "edgepress: error: 415" in capsys.readouterr().err
    assert main(["--api", live_stack.api_url, "--json", "upload", str(bad)]) == EXIT_REFUSED
    problem = json.loads(capsys.readouterr().out)["error"]
    assert (problem["status"], problem["code"]) == (415, "unsafe_format")


@pytest.mark.slow
def test_export_a_user_module_to_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "usernet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 3)

            def forward(self, x):
                return torch.relu(self.fc(x))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "net.onnx"
    code = main(["--json", "export", "--module", "usernet:Net", "--input-shape", "x=2x8",
                 "--dynamic", "x=0:batch", "-o", str(out)])
    assert code == EXIT_OK
    result = json.loads(capsys.readouterr().out)  # stdout holds only our JSON
    assert result["inputs"] == {"x": [2, 8]} and out.stat().st_size == result["bytes"]
    import onnx

    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 8
    assert main(["export", "--module", "usernet:Missing", "--input-shape", "x=2x8"]) == 8


def test_wait_prints_the_speedup_per_thread_count() -> None:
    # What `edgepress wait` / `status` prints for a finished job: its result's speedups at 1
    # thread and at the target's thread count, with the placebo band, in the headline's words.
    import io

    from service.cli import Output, _print_job
    from service.engine.headline import threads_words

    result = dict(RESULT, speedup_1_thread=1.5, latency_threads=[1, 2],
                  placebo_band=[0.97, 1.03])
    stream = io.StringIO()
    _print_job(Output(False, stream), _job(state=JobState.succeeded, result=result))
    line = next(t for t in stream.getvalue().splitlines() if t.startswith("latency by threads"))
    assert line.endswith(threads_words(result) or "-")
    assert "1 thread: 1.50x faster; 2 threads: 1.33x faster (decides, placebo band 0.97-1.03)" in line
