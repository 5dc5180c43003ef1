"""The environment a process that reads a stranger's file is started with.

The engine's forkserver (``service.worker.isolation``) and the API's inspection children
(``service.api.inspection``) get only what Python, numpy and ONNX Runtime need to run; never
credentials (S3 keys, broker password, webhook secret) or other settings of the parent. One list
for both, so the two cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CHILD_ENV_ALLOW = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "PYTHONPATH",
    "PYTHONHASHSEED", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "GLIBC_TUNABLES",
    # set on processors where older OpenBLAS builds compute wrong results or crash
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
)


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) cut to ``CHILD_ENV_ALLOW``."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k in CHILD_ENV_ALLOW}
