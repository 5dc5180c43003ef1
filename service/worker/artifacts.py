"""``JobArtifacts``: a job's output files on their way to the object store.

The engine announces a file as soon as it is final (the compressed model, while it is still
evaluated): it is uploaded in the background at once (``announce``). When the engine is done,
``store`` uploads the rest of its outcome side by side, skipping what was already stored from
the same file and deleting what was announced but is not part of the outcome. A job that does
not succeed ``discard``s what was stored early; ``close`` waits for every upload (the workdir
is removed after).

Every path is checked first (``artifact_path``): the engine reads untrusted models, and were it
subverted it must not be able to hand out any other file of the worker's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from service.jobs.store import artifact_key
from service.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

ARTIFACT_TYPES = {
    "model.onnx": "application/octet-stream",
    # the weights of a model kept in external data: saved beside model.onnx under this name
    "model.onnx.data": "application/octet-stream",
    "model.onnx.zst": "application/zstd",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}


def artifact_path(workdir: Path, name: str, raw: str) -> Path:
    """The file the engine names as artifact ``name``, checked: a known artifact name, a
    regular file (not a link) inside the job's workdir; ValueError otherwise."""
    if name not in ARTIFACT_TYPES:
        raise ValueError(f"unknown artifact {name!r}")
    path = Path(raw)
    if not path.is_absolute() or path.is_symlink() or not path.is_file():
        raise ValueError(f"artifact {name!r} is not a regular file: {raw!r}")
    if not path.resolve().is_relative_to(workdir.resolve()):
        raise ValueError(f"artifact {name!r} lies outside the job's workdir: {raw!r}")
    return path.resolve()


class JobArtifacts:
    def __init__(self, store: ObjectStore, job_id: str, workdir: Path) -> None:
        self._store, self._job_id, self._workdir = store, job_id, workdir
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[str, tuple[Path, Future[str]]] = {}
        self._lock = threading.Lock()
        self.seconds = 0.0  # spent uploading in the background, while the engine ran

    def _upload(self, name: str, path: Path) -> str:
        self._store.upload_file(
            artifact_key(self._job_id, name),
            path,
            content_type=ARTIFACT_TYPES[name],
            metadata={"job": self._job_id},
        )
        return name

    # -- while the engine runs -----------------------------------------------------------------
    def announce(self, name: str, raw: str) -> None:
        """The engine says the file of artifact ``name`` is final: upload it now."""
        try:
            path = artifact_path(self._workdir, name, raw)
        except ValueError as exc:
            log.warning("job %s: early artifact ignored: %s", self._job_id, exc)
            return
        with self._lock:
            if name in self._started:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="artifact")
            future = self._pool.submit(self._upload_early, name, path)
            self._started[name] = (path, future)

    def _upload_early(self, name: str, path: Path) -> str:
        started = time.monotonic()
        self._upload(name, path)
        with self._lock:
            self.seconds += time.monotonic() - started
        return name

    def wait_announced(self) -> list[str]:
        """Names of the early uploads, once all are stored (re-raises an upload's error)."""
        with self._lock:
            started = list(self._started.values())
        return [future.result() for _, future in started]

    def _covers(self, name: str, path: Path) -> bool:
        with self._lock:
            return name in self._started and self._started[name][0] == path

    # -- once the engine is done ---------------------------------------------------------------
    def store(
        self, artifacts: dict[str, str], meanwhile: Callable[[], object] | None = None
    ) -> list[str]:
        """Store the engine's outcome ``artifacts`` (name: path), side by side, except those
        already stored while it ran; ``meanwhile`` runs beside the uploads (recording the
        stage). The stored names, sorted. ValueError: a path the engine may not hand out
        (nothing is uploaded then)."""
        paths = {name: artifact_path(self._workdir, name, raw) for name, raw in artifacts.items()}
        # Early uploads end first, so that a re-upload below is the last write of its key.
        stored = set(self.wait_announced())
        for name in stored - set(paths):  # announced, then not part of the outcome
            self._store.delete(artifact_key(self._job_id, name))
        todo = [name for name in paths if not self._covers(name, paths[name])]
        with ThreadPoolExecutor(max_workers=min(4, len(todo) + 1)) as pool:
            beside = pool.submit(meanwhile) if meanwhile is not None else None
            done = list(pool.map(lambda n: self._upload(n, paths[n]), todo))
            if beside is not None:
                beside.result()
        return sorted(set(done) | (stored & set(paths)))

    def abandon(self) -> None:
        """The job is another worker's now: start no further upload (its artifacts are not
        ours to store or delete)."""
        with self._lock:
            for _, future in self._started.values():
                future.cancel()

    def discard(self) -> None:
        """The job did not succeed: remove what was stored early."""
        with self._lock:
            started = dict(self._started)
        for name, (_, future) in started.items():
            with contextlib.suppress(Exception):
                future.result()
            with contextlib.suppress(Exception):
                self._store.delete(artifact_key(self._job_id, name))

    def close(self) -> None:
        """Wait for every upload still running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
