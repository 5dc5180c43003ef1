"""Schemathesis against api_spec/openapi.yaml on the live stack: zero 5xx, every response
matches the spec. Bounded: a fixed number of examples per operation, a fixed seed.

``positive_data_acceptance`` is excluded on purpose: schema-valid bytes are not necessarily a
valid ONNX model or .npz (the schema cannot say so), and such uploads must be refused.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

SPEC = Path(__file__).resolve().parents[2] / "api_spec" / "openapi.yaml"


def test_schemathesis_finds_no_failure(live_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is a dev dependency"
    proc = subprocess.run(
        [st, "run", str(SPEC), "--url", live_stack.api_url, "--max-examples", "20", "--seed", "7",
         "--request-timeout", "30", "--exclude-checks", "positive_data_acceptance",
         "--max-failures", "20", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail
