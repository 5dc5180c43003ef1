"""api_spec/API.md is the rendering of the current openapi.yaml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rendered_api_docs_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_api_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
