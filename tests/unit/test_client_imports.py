"""The client is importable without the server's libraries: no Flask, boto3, Celery or Redis
(a CI step installs the client, not the service's stack)."""

from __future__ import annotations

import subprocess
import sys

_BLOCK = '''
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"flask", "werkzeug", "boto3", "botocore", "celery", "kombu",
                                  "redis"}:
            raise ImportError(f"the client imported {name}")
        return None

sys.meta_path.insert(0, Block())
'''

def _import_client(prelude: str) -> subprocess.CompletedProcess[str]:
    code = prelude + "\nimport service.client\nprint('imported')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


def test_the_client_needs_no_server_library() -> None:
    out = _import_client(_BLOCK)
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr[-2000:]

