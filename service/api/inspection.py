"""Inspect uploads in a child process with resource limits (see ``inspect_child``)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.config import Settings, limits_for
from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from service.uploads.records import UploadKind


def _child_env() -> dict[str, str]:
    """The parser of a stranger's file gets no credentials: only what Python needs to run."""
    keep = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL", "TMPDIR", "HOME")
    return {k: v for k, v in os.environ.items() if k in keep}


def inspect_in_child(
    kind: UploadKind[Any],
    path: Path,
    filename: str | None,
    limits: EngineLimits,
    settings: Settings,
) -> dict[str, Any]:
    """The engine's description of the upload, or ``EngineError`` with a precise code."""
    service_limits = limits_for(settings)

    def apply_limits() -> None:
        for name, pair in service_limits.inspect_rlimits.items():
            resource.setrlimit(getattr(resource, name), pair)

    spec = {
        "kind": kind.name,
        "path": str(path),
        "filename": filename,
        "limits": limits.model_dump(mode="json"),
    }
    bad = kind.invalid_code
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, our own module
            [sys.executable, "-m", "service.api.inspect_child", json.dumps(spec)],
            capture_output=True,
            timeout=service_limits.inspect_seconds,
            preexec_fn=apply_limits,  # noqa: PLW1509 - limits for the child only
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EngineError(
            bad, "inspecting the upload took longer than this server allows"
        ) from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        if proc.returncode < 0:
            raise EngineError(
                bad, "the upload crashed the parser; it is not a valid file of its kind"
            )
        raise EngineError(
            bad, "the upload could not be inspected (the parser ran out of resources)"
        )
    if verdict.get("ok"):
        return dict(verdict["description"])
    err = verdict["error"]
    raise EngineError(err["code"], err["message"], err.get("details"))
