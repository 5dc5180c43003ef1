"""The API process must stay light: no torch, no onnxruntime (they are the worker's)."""

import subprocess
import sys


def test_api_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from service.api import create_app\n"
        "from service.config import Settings\n"
        "create_app(Settings(auth=\"open\"))\n"
        "import service.api.jobs, service.api.models, service.api.datasets, service.api.devices\n"
        "from service.engine.registry import registered_passes\n"
        "registered_passes()\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"API imported: {out.stdout.strip()}"
