"""The engine's isolation (service/worker/isolation.py): applied in a forked child as the engine
applies it, then probed from inside: no internet sockets, a user that cannot read root's files,
no credentials in the environment the engine's forkserver starts with."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing import forkserver
from pathlib import Path

import pytest

from service.worker import isolation
from service.worker.engine_host import start_engine_server

_SECCOMP = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")
_LANDLOCK = _SECCOMP and isolation.landlock_abi(isolation._libc()) >= 1


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory other users can reach (pytest's tmp_path is inside a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="edgepress-isolation-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _in_child(run: Callable[[], dict]) -> dict:
    """Fork, ``run()`` in the child; what it returned (a JSON object)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, whatever happens
        try:
            os.write(write, json.dumps(run()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def _in_isolated_child(workdir: Path, user: tuple[int, int] | None, probe: Path) -> dict:
    """Fork, isolate as the engine does, run the probes; what the child saw."""
    return _in_child(lambda: _probe(workdir, user, probe))


def _probe(workdir: Path, user: tuple[int, int] | None, probe: Path) -> dict:
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
        return seen


@pytest.mark.skipif(not _SECCOMP, reason="the filter is written for Linux x86_64/aarch64")
def test_the_filter_refuses_internet_sockets_and_keeps_unix_ones(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    seen = _in_isolated_child(tmp_path, None, secret)
    assert seen["applied"]["network_filter"] == "seccomp"
    assert seen["inet"] == seen["inet6"] == 13  # EACCES
    assert seen["unix"] == "allowed" and seen["probe"] == "read"  # same user: its own files
    if _LANDLOCK:
        assert seen["applied"]["filesystem"].startswith("landlock abi ")


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
    # network namespace only where unprivileged user namespaces are allowed; the source cache
    # is the engine's own user's, and only Landlock keeps it from the engine.
    workdir, cache = scratch / "job", scratch / "edgepress-source-cache"
    for path in (workdir, cache):
        path.mkdir()
        os.chown(path, 65534, 65534)
    def as_worker_user() -> dict:
        os.setgid(65534)
        os.setuid(65534)  # the "worker" is not root from here on
        (cache / "entry").write_text("another tenant's model")  # the worker caches it
        seen: dict = {"applied": isolation.apply(str(workdir), (12345, 12345), [])}
        try:
            seen["cache"] = (cache / "entry").read_text()
        except OSError as exc:
            seen["cache"] = exc.errno
        try:
            socket.socket(socket.AF_INET).close()
            seen["inet"] = "allowed"
        except OSError as exc:
            seen["inet"] = exc.errno
        seen["uid"] = os.getuid()
        return seen

    seen = _in_child(as_worker_user)
    assert seen["applied"]["user"] == "same (the worker is not root)" and seen["uid"] == 65534
    assert seen["applied"]["network_filter"] == "seccomp" and seen["inet"] == 13
    if _LANDLOCK:
        assert seen["applied"]["filesystem"].startswith("landlock abi ") and seen["cache"] == 13
    else:
        assert seen["applied"]["filesystem"].startswith("unavailable: ")
    assert seen["applied"]["network_namespace"] in ("userns+netns", "userns+netns (ids unmapped)") \
        or seen["applied"]["network_namespace"].startswith("none (")


# A fresh interpreter, as a search's spawned candidates are: after the restriction it imports
# numpy and ONNX Runtime (their shared libraries load only then), runs a session on the job's
# model, uses its temp dir; the source cache and another job's workdir (the workdir's siblings)
# and a file outside any allowed path cannot be read, nor a file made there.
_CONFINED_ENGINE = """
import json, os, sys, tempfile
from service.worker import isolation
workdir = sys.argv[1]
seen = {"applied": isolation.apply(workdir, None, [])}
os.environ["TMPDIR"] = os.path.join(workdir, "tmp")
def attempt(name, action):
    try:
        action()
        seen[name] = "ok"
    except OSError as exc:
        seen[name] = type(exc).__name__
for name, path in zip(("cache", "other_job", "outside"), sys.argv[2:]):
    attempt(name, lambda: open(path, "rb").read())
attempt("scratch_listing", lambda: os.listdir(os.path.dirname(workdir)))
attempt("outside_write", lambda: open(sys.argv[4] + ".new", "w").close())
attempt("own_input", lambda: open(os.path.join(workdir, "input", "m.onnx"), "rb").read())
attempt("own_temp", lambda: tempfile.NamedTemporaryFile().close())
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(os.path.join(workdir, "input", "m.onnx"),
                               providers=["CPUExecutionProvider"])
feed = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()}
seen["outputs"] = len(session.run(None, feed))
seen["tempdir"] = tempfile.gettempdir()
print(json.dumps(seen))
"""


@pytest.mark.skipif(not _LANDLOCK, reason="the kernel has no Landlock")
def test_landlock_keeps_the_engine_to_its_workdir_and_what_it_runs_from(scratch: Path) -> None:
    from tests.models import write_mlp

    workdir = scratch / "job"
    (workdir / "input").mkdir(parents=True)
    (workdir / "tmp").mkdir()
    write_mlp(workdir / "input" / "m.onnx", inputs=8, hidden=8)
    cache = scratch / "edgepress-source-cache"  # as JobRunner lays the scratch dir out
    cache.mkdir()
    (cache / "entry").write_bytes(b"another tenant's model")
    other = scratch / "job-of-another-tenant" / "input"
    other.mkdir(parents=True)
    (other / "m.onnx").write_bytes(b"another tenant's model")
    outside = Path(tempfile.mkdtemp(prefix="edgepress-outside-")) / "secret"
    outside.write_text("x")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CONFINED_ENGINE, str(workdir), str(cache / "entry"),
             str(other / "m.onnx"), str(outside)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        assert not Path(f"{outside}.new").exists()
    finally:
        shutil.rmtree(outside.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["applied"]["filesystem"] == f"landlock abi {isolation.landlock_abi(isolation._libc())}"
    assert seen["cache"] == seen["other_job"] == seen["outside"] == "PermissionError"
    assert seen["scratch_listing"] == seen["outside_write"] == "PermissionError"
    assert seen["own_input"] == seen["own_temp"] == "ok"
    assert seen["outputs"] == 1 and seen["tempdir"] == str(workdir / "tmp")


def test_no_rule_reaches_the_scratch_directory_whatever_lists_it(
    scratch: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = scratch / "job"
    workdir.mkdir()
    (scratch / "edgepress-source-cache").mkdir()
    # A sys.path holding the filesystem root, the scratch dir and the cache: none is allowed.
    monkeypatch.setattr(sys, "path", [*sys.path, "/", str(scratch),
                                      str(scratch / "edgepress-source-cache")])
    rules = dict(isolation.landlock_rules(str(workdir), abi=3))
    for path in rules:
        if path != str(workdir):
            assert os.path.commonpath([path, str(scratch)]) not in (path, str(scratch)), path
    assert rules[str(workdir)] == (1 << 15) - 1  # every right of ABI 3
    for needed in (sys.base_prefix, str(Path(isolation.__file__).parents[1])):  # the code
        assert any(Path(needed).resolve().is_relative_to(path) and access == 0b1101
                   for path, access in rules.items()), needed  # execute, read file, read dir
    assert len(rules) < 40  # one rule per tree, not per library


@pytest.mark.skipif(not _SECCOMP, reason="the filter is written for Linux x86_64/aarch64")
def test_a_kernel_without_landlock_is_recorded_and_the_rest_still_applies(tmp_path: Path) -> None:
    # As on a kernel built without it: landlock_create_ruleset answers ENOSYS (a seccomp
    # filter of the child's own makes it so).
    def without_landlock() -> dict:
        arch = isolation._ARCHES[platform.machine()][0]
        prog = b"".join([
            isolation._bpf(0x20, 0, 0, 4), isolation._bpf(0x15, 1, 0, arch),
            isolation._bpf(0x06, 0, 0, 0x7FFF0000),
            isolation._bpf(0x20, 0, 0, 0), isolation._bpf(0x15, 0, 1, 444),
            isolation._bpf(0x06, 0, 0, 0x00050000 | 38), isolation._bpf(0x06, 0, 0, 0x7FFF0000),
        ])
        buf = ctypes.create_string_buffer(prog, len(prog))

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        libc = isolation._libc()
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        if libc.prctl(22, 2, ctypes.byref(Fprog(len(prog) // 8, ctypes.addressof(buf))), 0, 0):
            return {"applied": {"filesystem": "our filter was refused"}}
        seen = {"applied": isolation.apply(str(tmp_path), None, [])}
        (tmp_path / "out").write_text("written")
        return seen

    seen = _in_child(without_landlock)
    assert seen["applied"]["filesystem"] == "unavailable: Function not implemented"
    assert seen["applied"]["network_filter"] == "seccomp"
    assert (tmp_path / "out").read_text() == "written"
