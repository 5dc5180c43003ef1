"""End to end through the ``edgepress`` command (a subprocess) against the real stack:
upload -> submit -> wait -> download -> report, and the exit codes a CI step relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.models import write_mlp

pytestmark = pytest.mark.stack


def _edgepress() -> list[str]:
    script = Path(sys.executable).parent / "edgepress"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


@pytest.fixture(scope="module")
def run(live_stack: Any) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRESS_")}
    env["EDGEPRESS_API_URL"] = live_stack.api_url  # the CLI's own variable

    def call(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_edgepress(), *args], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)

    return call


def test_upload_submit_wait_download_report(run: Any, tmp_path: Path) -> None:
    source = write_mlp(tmp_path / "mlp.onnx", inputs=128, hidden=512)
    up = run("--json", "upload", str(source))
    assert up.returncode == 0, up.stderr
    model = json.loads(up.stdout)
    assert model["id"].startswith("mdl_") and model["bytes"] == source.stat().st_size

    sub = run("submit", model["id"], "--pass", "quantize_dynamic:per_channel=true",
              "--min-fidelity", "0.99")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert job_id.startswith("job_") and "\n" not in job_id

    wait = run("wait", job_id, "--poll", "0.3")
    assert wait.returncode == 0, wait.stdout + wait.stderr
    progress = wait.stderr.splitlines()
    assert progress[-1] == f"{job_id} succeeded succeeded 100.0%"  # plain lines, not a TTY
    assert "\r" not in wait.stderr
    assert "x smaller" in wait.stdout and "state        succeeded" in wait.stdout
    # No dataset: the fidelity's evidence and the warning that says so are printed.
    assert re.search(r"^evaluated on\s+generated inputs, \d+ samples$", wait.stdout, re.M)
    assert "measured on generated inputs" in wait.stdout

    out_dir = tmp_path / "out"
    dl = run("--json", "download", job_id, "-o", str(out_dir), "--check")
    assert dl.returncode == 0, dl.stderr
    saved = {item["name"]: item for item in json.loads(dl.stdout)}
    assert {"model.onnx", "report.json", "report.html"} <= set(saved)
    compressed = out_dir / "model.onnx"
    x = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    got = ort.InferenceSession(str(compressed), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.99

    rep = run("report", job_id)
    assert rep.returncode == 0, rep.stderr
    assert re.search(r"^recipe\s+quantize_dynamic$", rep.stdout, re.M) and "x smaller" in rep.stdout
    listed = run("--json", "list", "--limit", "50")
    assert job_id in {j["id"] for j in json.loads(listed.stdout)}
    status = run("status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "succeeded"


def test_unmet_constraint_of_a_recipe_job_fails_the_step(run: Any, tmp_path: Path) -> None:
    source = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=256)
    done = run("--json", "submit", str(source), "--pass", "quantize_dynamic",
               "--max-size-mb", "0.001", "--wait", "--poll", "0.3")
    assert done.returncode == 3, done.stdout + done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "succeeded"
    assert job["unmet_constraints"][0].startswith("max_size_mb:")


def test_auto_job_that_cannot_meet_its_constraints_exits_3(run: Any, tmp_path: Path) -> None:
    source = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=256)
    done = run("submit", str(source), "--auto", "--max-size-mb", "0.0001", "--wait", "--quiet")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "constraints_unsatisfiable" in done.stdout
    assert "missed max_size_mb" in done.stdout
    assert done.stderr.startswith("uploaded ")  # --quiet: no progress lines


def test_unknown_pass_is_refused_with_exit_5(run: Any, tmp_path: Path) -> None:
    source = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=256)
    done = run("--json", "submit", str(source), "--pass", "no_such_pass")
    assert done.returncode == 5, done.stdout + done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "unknown_pass"


def test_uploaded_datasets_are_listed(run: Any, tmp_path: Path) -> None:
    data = tmp_path / "samples.npz"
    rng = np.random.default_rng(11)
    np.savez(data, x=rng.standard_normal((6, 128)).astype(np.float32),
             labels=rng.integers(0, 10, 6))
    up = run("--json", "upload", str(data))
    assert up.returncode == 0, up.stderr
    dataset = json.loads(up.stdout)
    assert dataset["id"].startswith("ds_")
    listed = run("--json", "list", "--datasets", "--limit", "500")
    assert listed.returncode == 0, listed.stderr
    mine = [d for d in json.loads(listed.stdout) if d["id"] == dataset["id"]]
    assert mine and mine[0]["samples"] == 6 and mine[0]["has_labels"] is True
    table = run("list", "--datasets", "--limit", "500")
    row = next(line for line in table.stdout.splitlines() if line.startswith(dataset["id"]))
    assert "samples.npz" in row and " 6 " in f" {row} " and "yes" in row
    both = run("list", "--datasets", "--models")
    assert both.returncode != 0 and "not allowed with" in both.stderr
