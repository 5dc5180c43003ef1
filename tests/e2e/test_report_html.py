"""report.html: rendered by the engine, produced by a real job, loaded in a real Chromium.

The stack test runs an auto job on the live stack, fetches its report.html through the client
(the artifact the user gets), loads it in headless Chromium (Debian ``chromium``, installed by
scripts/install_tools.sh), checks the DOM for the charts and takes a phone-sized screenshot.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.report_html import op_type_latency, render_report_html
from tests.models import write_mlp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _nonblank_fraction(png: bytes) -> float:
    """Share of non-zero bytes in the PNG's filtered scanlines: ~0 for a blank page."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return 1.0 - raw.count(0) / len(raw)


# ---------------------------------------------------------------------------------------------
# Rendering (no browser)


def test_hostile_strings_are_escaped_and_nothing_is_fetched() -> None:
    evil = '<script>alert(1)</script><img src="http://evil.example/x.png">'
    report = {
        "input": {"format": "onnx", "inputs": [{"name": evil, "dtype": "float32",
                                                 "shape": [1, 3]}], "op_types": {evil: 1}},
        "passes": [{"pass": evil, "config": {"x": evil}, "seconds": 1.0,
                    "notes": {"quantized": [{"node": evil, "op": "MatMul", "kernel": evil}]}}],
        "warnings": [evil], "fidelity": {evil: {"cosine": 0.99}},
        "recipe": [{"pass": evil}],
    }
    page = render_report_html(report)
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page), "external resource"
    assert "&lt;script&gt;" in page


def test_empty_and_minimal_reports_render() -> None:
    page = render_report_html({})
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert 'name="viewport"' in page and "@media" in page


def test_auto_report_has_pareto_sensitivity_and_op_latency_charts() -> None:
    report = {
        "summary": {"min_cosine": 0.995, "speedup": 1.6, "latency_ms_before": 1.0,
                    "latency_ms_after": 0.6, "auto": {"device": "raspberry_pi_5",
                                                  "target_latency_ms": 2.0,
                                                  "target_speedup": 2.5}},
        "size": {"bytes_before": 4_000_000, "bytes_after": 1_000_000, "ratio": 4.0},
        "latency": {"before_ms": 1.0, "after_ms": 0.6, "speedup": 1.6,
                    "by_op_type": {"before": {"Conv": 0.8, "Relu": 0.1},
                                   "after": {"QLinearConv": 0.45, "Relu": 0.1},
                                   "runs": 10}},
        "auto": {
            "target_measured": False,
            "chosen": {"candidate": "int8_u8s8", "why": "smallest that meets every constraint",
                       "target_estimate": {"device": "raspberry_pi_5", "latency_ms": 2.0,
                                           "by_precision": {"int8": {"ms": 1.5},
                                                            "fp32": {"ms": 0.5}}}},
            "pareto_front": {"latency_source": "target_estimate", "front": ["int8_u8s8"],
                             "points": [
                                 {"candidate": "original", "size_mb": 4.0, "latency_ms": 5.0,
                                  "fidelity": 1.0, "on_front": True},
                                 {"candidate": "int8_u8s8", "size_mb": 1.0, "latency_ms": 2.0,
                                  "fidelity": 0.995, "on_front": True},
                                 {"candidate": "fp16", "size_mb": 2.0, "latency_ms": 4.5,
                                  "fidelity": 0.9999, "on_front": False}]},
            "mixed_precision": [{"from": "int8_u8s8", "metric": "cosine", "base": 0.97,
                                 "kept_float": ["conv1"],
                                 "sensitivity": [{"layer": "conv1", "op": "Conv", "gain": 0.02},
                                                 {"layer": "fc", "op": "Gemm", "gain": -0.001}]}],
            "candidates": [{"name": "int8_u8s8", "status": "ok", "meets_constraints": True,
                            "metrics": {"bytes": 1_000_000, "size_ratio": 4.0}}],
        },
    }
    page = render_report_html(report)
    for ident in ("pareto", "layers", "ops", "chosen", "candidates", "estimates"):
        assert f'id="{ident}"' in page, ident
    assert page.count("<svg") >= 4
    assert "QLinearConv" in page and "conv1 (Conv)" in page
    assert "smallest that meets every constraint" in page
    assert "1.60× · 1.60x faster" in page and "Estimated on raspberry_pi_5" in page


def test_op_type_latency_profiles_a_real_model(tmp_path: Path) -> None:
    path = write_mlp(tmp_path / "mlp.onnx", inputs=64, hidden=256)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    ops = op_type_latency(path, {"x": x}, runs=5)
    assert ops and all(ms > 0 for ms in ops.values())
    assert any("Gemm" in op or "MatMul" in op for op in ops), ops


# ---------------------------------------------------------------------------------------------
# A real job's report in a real browser


@pytest.mark.stack
def test_job_report_html_in_headless_chromium(live_stack: Any, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/install_tools.sh")
    from service.client import EdgePressClient

    client = EdgePressClient(live_stack.api_url)
    model = client.upload_model(write_mlp(tmp_path / "mlp.onnx", inputs=128, hidden=512))
    job = client.wait(client.submit_job(model.id, recipe="auto",
                                        constraints={"objective": "size"}).id,
                      poll=0.3, timeout=240)
    assert job.state.value == "succeeded", job.error
    assert "report.html" in job.artifacts
    page = client.download_artifact(job.id, "report.html", tmp_path / "report.html")

    profile = tmp_path / "chromium-profile"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<svg") >= 2, "the Pareto and layer charts must be in the DOM"
    pareto = html[html.index('id="pareto"'):]
    assert "<svg" in pareto[:pareto.index("</section>")]
    assert "<circle" in html and "Chosen candidate" in html
    chosen = ((job.result or {}).get("auto") or {}).get("candidate")
    assert chosen, f"an auto job's result names its chosen candidate: {job.result}"
    assert f'<p class="why"><strong>{chosen}</strong>' in html  # the page names the same one
    speedup = job.result["speedup"]
    card = html[html.find("Latency (this host)"):][:400]
    assert f"{speedup:.2f}× · " in card, card  # the result's speedup, the one the page shows

    shot = tmp_path / "report.png"
    run = subprocess.run([*base, "--hide-scrollbars", "--window-size=412,2200",
                          f"--screenshot={shot}", url], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    png = shot.read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (412, 2200)
    assert len(png) > 30_000 and _nonblank_fraction(png) > 0.02, "the screenshot looks blank"
    keep = Path(live_stack.dir) / "report-screenshot.png"
    shutil.copyfile(shot, keep)  # left next to the stack's logs for a human to look at
