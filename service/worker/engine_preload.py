"""Imported last by the engine's forkserver, before it forks any job.

Everything a job would otherwise import lazily on its first use (every pass module, the
settings and store modules used to resolve other models) is imported here once, and the
server's objects are then frozen out of the garbage collector (``gc.freeze``): a collection in
a forked engine process would otherwise walk, and so copy page by page, the whole heap it
shares with the server.
"""

from __future__ import annotations

import gc

import service.config
import service.storage.s3
import service.uploads.store
from service.engine.registry import registered_passes

registered_passes()
gc.collect()
gc.freeze()

__all__ = ["service"]
