"""Inspect uploads in a child process with resource limits (see ``inspect_child``).

Bounded three ways: the child's own limits (memory, RLIMIT_DATA, and CPU from the settings, below the
API pod's memory; a file-size limit; no core dumps), the archive expansion it may do (the
operator's ``max_uncompressed_bytes``, and never more than the scratch space free *now*, less a
reserve: several uploads share that disk, so it is measured per request), and how many run at
once per API process (``EDGEPRESS_INSPECT_CONCURRENCY``: a full process answers 503 with
``Retry-After`` rather than queue memory-hungry children).

The limits are set by the child itself, first thing, before it opens the upload (``python -m
service.api.inspect_child`` is our code; the stranger's file is read only after): no
``preexec_fn``, which is not safe in a threaded server (gunicorn's gthread workers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from service.child_env import child_environment
from service.config import Settings, limits_for
from service.engine.errors import EngineError
from service.engine.limits import EngineLimits
from service.errors import Unavailable
from service.uploads.records import UploadKind

# Scratch space an inspection leaves free for everything else on the disk (other uploads
# being received, the API's own temporary files).
SCRATCH_RESERVE_BYTES = 256 * 1024 * 1024


def _child_env(scratch: str) -> dict[str, str]:
    """The parser of a stranger's file gets no credentials: only what Python needs to run;
    its temporary files (an archive's expansion) go to the scratch space measured."""
    env = child_environment()
    env["TMPDIR"] = scratch
    return env


def expansion_limit(limits: EngineLimits, scratch: str) -> int:
    """Most bytes an archive may expand to now: the operator's cap, within the free space."""
    free = shutil.disk_usage(scratch).free - SCRATCH_RESERVE_BYTES
    return max(0, min(limits.max_uncompressed_bytes, free))


def inspect_in_child(
    kind: UploadKind[Any],
    path: Path,
    filename: str | None,
    limits: EngineLimits,
    settings: Settings,
    slots: threading.BoundedSemaphore | None = None,
) -> dict[str, Any]:
    """The engine's description of the upload, or ``EngineError`` with a precise code;
    ``Unavailable`` (503) when ``slots`` (this process's inspections) are all taken."""
    if slots is not None and not slots.acquire(blocking=False):
        raise Unavailable("this server is inspecting as many uploads as it can; retry shortly",
                          retry_after=5, code="inspection_busy")
    try:
        return _inspect(kind, path, filename, limits, settings)
    finally:
        if slots is not None:
            slots.release()


def _inspect(
    kind: UploadKind[Any], path: Path, filename: str | None, limits: EngineLimits,
    settings: Settings,
) -> dict[str, Any]:
    service_limits = limits_for(settings)
    scratch = settings.scratch_dir or tempfile.gettempdir()
    expand = expansion_limit(limits, scratch)
    bounded = limits.model_copy(update={"max_uncompressed_bytes": max(1, expand)})
    rlimits = dict(service_limits.inspect_rlimits)
    # No file it writes may exceed what the whole expansion may be (plus room for its output).
    rlimits["RLIMIT_FSIZE"] = (expand + 1024 * 1024,) * 2
    spec = {
        "kind": kind.name,
        "path": str(path),
        "filename": filename,
        "limits": bounded.model_dump(mode="json"),
        "rlimits": {name: list(pair) for name, pair in rlimits.items()},
    }
    bad = kind.invalid_code
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, our own module
            [sys.executable, "-m", "service.api.inspect_child", json.dumps(spec)],
            capture_output=True,
            timeout=service_limits.inspect_seconds,
            stdin=subprocess.DEVNULL,
            env=_child_env(scratch),
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
