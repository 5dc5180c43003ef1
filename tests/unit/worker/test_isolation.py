"""The engine's isolation (service/worker/isolation.py): applied in a forked child as the engine
applies it, then probed from inside: no internet sockets, a user that cannot read root's files,
no credentials in the environment the engine's forkserver starts with."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path

import pytest

from service.worker import isolation
from service.worker.engine_host import start_engine_server

_SECCOMP = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory other users can reach (pytest's tmp_path is inside a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="edgepress-isolation-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _in_isolated_child(workdir: Path, user: tuple[int, int] | None, probe: Path) -> dict:
    """Fork, isolate as the engine does, run the probes; what the child saw."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, whatever happens
        try:
            _probe(workdir, user, probe, write)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def _probe(workdir: Path, user: tuple[int, int] | None, probe: Path, write: int) -> None:
    if True:
        seen: dict = {"applied": isolation.apply(str(workdir), user, [])}
        for name, family, kind in (("inet", socket.AF_INET, socket.SOCK_STREAM),
                                   ("inet6", socket.AF_INET6, socket.SOCK_DGRAM),
                                   ("unix", socket.AF_UNIX, socket.SOCK_STREAM)):
            try:
                socket.socket(family, kind).close()
                seen[name] = "allowed"
            except OSError as exc:
                seen[name] = exc.errno
        seen["uid"] = os.getuid()
        try:
            probe.read_bytes()
            seen["probe"] = "read"
        except OSError as exc:
            seen["probe"] = exc.errno
        (workdir / "out").write_text("written")  # the job's own directory stays writable
        os.write(write, json.dumps(seen).encode())


@pytest.mark.skipif(not _SECCOMP, reason="the filter is written for Linux x86_64/aarch64")
def test_the_filter_refuses_internet_sockets_and_keeps_unix_ones(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    seen = _in_isolated_child(tmp_path, None, secret)
    assert seen["applied"]["network_filter"] == "seccomp"
    assert seen["inet"] == seen["inet6"] == 13  # EACCES
    assert seen["unix"] == "allowed" and seen["probe"] == "read"  # same user: its own files


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs a root worker")
def test_a_root_worker_runs_the_engine_as_another_user_who_cannot_read_the_cache(
    scratch: Path,
) -> None:
    tmp_path = scratch
    cache = tmp_path / "source-cache"  # as SourceCache makes it: root's, 0700
    cache.mkdir(mode=0o700)
    (cache / "entry").write_text("another tenant's model")
    workdir = tmp_path / "job"
    workdir.mkdir(mode=0o700)
    (workdir / "input").mkdir()
    seen = _in_isolated_child(workdir, (65534, 65534), cache / "entry")
    assert seen["applied"]["user"] == "uid 65534" and seen["uid"] == 65534
    assert seen["probe"] == 13  # EACCES
    assert seen["applied"]["network_namespace"] in ("netns", "userns+netns")
    assert (workdir / "out").read_text() == "written"
    assert (workdir / "input").stat().st_uid == 65534  # the job's files were handed over


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs a root worker")
def test_no_user_change_where_that_user_could_not_run_the_interpreter(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    workdir = tmp_path / "job"
    workdir.mkdir()
    assert isolation.hand_over(str(workdir), 65534, 65534, [str(private)]) == (
        f"uid 65534 cannot read {private}")
    assert workdir.stat().st_uid == 0  # nothing handed over


def test_the_engine_server_starts_with_no_credential_in_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forkserver._forkserver._stop()  # type: ignore[attr-defined]  # one per process: restart it
    monkeypatch.setenv("EDGEPRESS_S3_SECRET_KEY", "s3-secret-value")
    monkeypatch.setenv("EDGEPRESS_BROKER_URL", "redis://:broker-password@127.0.0.1:6379/0")
    monkeypatch.setenv("EDGEPRESS_WEBHOOK_SECRET", "webhook-secret-value")
    start_engine_server(huge_pages=True)
    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    environ = b""
    while not environ and time.monotonic() < deadline:  # empty until its exec is done
        environ = Path(f"/proc/{pid}/environ").read_bytes()  # what every engine fork starts with
        time.sleep(0.05)
    for secret in (b"s3-secret-value", b"broker-password", b"webhook-secret-value", b"EDGEPRESS_"):
        assert secret not in environ
    assert b"PATH=" in environ and b"glibc.malloc.hugetlb=1" in environ
    assert os.environ["EDGEPRESS_S3_SECRET_KEY"] == "s3-secret-value"  # ours is restored
    forkserver._forkserver._stop()  # type: ignore[attr-defined]  # later tests get a clean one


def test_the_seccomp_program_has_one_instruction_per_8_bytes_and_no_table_elsewhere() -> None:
    program = isolation.seccomp_program("x86_64")
    assert program is not None and len(program) == 13 * 8
    assert isolation.seccomp_program("riscv64") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs two processes of one other user")
def test_a_protected_worker_hides_its_environment_from_an_engine_of_the_same_user() -> None:
    def reader_sees(protect: bool) -> str:
        ready_r, ready_w = os.pipe()
        worker = os.fork()
        if worker == 0:  # the "worker": uid 65534 with a secret in its environment
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.environ["EDGEPRESS_S3_SECRET_KEY"] = "s3-secret-value"
                # A process started as that user is dumpable (the change of uid here made it
                # not); then protect it, or not.
                isolation._libc().prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
                if protect:
                    assert isolation.protect_worker()
                os.write(ready_w, b"1")
                time.sleep(5)
            finally:
                os._exit(0)
        os.read(ready_r, 1)
        out_r, out_w = os.pipe()
        engine = os.fork()
        if engine == 0:  # the "engine": the same uid
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    Path(f"/proc/{worker}/environ").read_bytes()
                    os.write(out_w, b"read")
                except OSError as exc:
                    os.write(out_w, str(exc.errno).encode())
            finally:
                os._exit(0)
        os.close(out_w)
        seen = os.read(out_r, 64).decode()
        os.waitpid(engine, 0)
        os.kill(worker, 9)
        os.waitpid(worker, 0)
        return seen

    assert reader_sees(protect=False) == "read"  # what an engine of the worker's uid could do
    assert reader_sees(protect=True) == "13"  # EACCES


@pytest.mark.skipif(os.geteuid() != 0 or not _SECCOMP, reason="needs root to become a non-root worker")
def test_a_non_root_worker_keeps_its_user_and_still_gets_the_filter(scratch: Path) -> None:
    # As in the k8s pods (uid 10001, no CAP_SETUID): no user change, the filter applies, and a
    # network namespace only where unprivileged user namespaces are allowed.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)  # the "worker" is not root from here on
            seen = {"applied": isolation.apply(str(scratch), (12345, 12345), [])}
            try:
                socket.socket(socket.AF_INET).close()
                seen["inet"] = "allowed"
            except OSError as exc:
                seen["inet"] = exc.errno
            seen["uid"] = os.getuid()
            os.write(write, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        seen = json.loads(f.read())
    os.waitpid(pid, 0)
    assert seen["applied"]["user"] == "same (the worker is not root)" and seen["uid"] == 65534
    assert seen["applied"]["network_filter"] == "seccomp" and seen["inet"] == 13
    assert seen["applied"]["network_namespace"] in ("userns+netns", "userns+netns (ids unmapped)") \
        or seen["applied"]["network_namespace"].startswith("none (")
