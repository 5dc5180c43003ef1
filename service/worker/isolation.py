"""What the engine process may not have: the worker's secrets, the network, the worker's user.

The engine parses a stranger's model with native libraries (protobuf, ONNX Runtime, torch); if
one of them is ever made to run code, that code should find nothing worth taking and nowhere to
send it. Applied in the engine child (``engine_host.run_forked``) before it reads the spec:

- **environment**: the engine's forkserver is started with ``engine_environment()`` only (an
  allow-list: paths, locale, thread counts), so no S3 key, broker URL or webhook secret is in
  the engine's memory or ``/proc/<pid>/environ``; referenced models are fetched by the worker
  beforehand (the engine makes no S3 client).
- **user**: where the worker runs as root, the engine drops to ``EDGEPRESS_ENGINE_UID``/``GID``
  (the job's workdir is handed to that user; the source cache stays root's, mode 0700, and the
  worker's ``/proc`` entries become unreadable to it). A worker that is not root (the k8s pods
  run as uid 10001 without CAP_SETUID) cannot change user: recorded as ``"user": "same"``.
- **network**: a new network namespace where the kernel lets us make one (root: CLONE_NEWNET;
  otherwise an unprivileged user namespace with it, which container runtimes' default seccomp
  profiles usually refuse), and a seccomp filter in every case the kernel has seccomp
  (x86_64/aarch64): ``socket()`` of any family but AF_UNIX and ``io_uring_setup`` fail with
  EACCES/ENOSYS. The filter needs only ``no_new_privs``, so it also applies in the k8s pods.

``apply`` returns what applied; the engine writes it into the job's summary (``isolation``)
and the worker logs it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import Any

# Variables an engine process keeps; everything else (credentials above all) is dropped.
ENGINE_ENV_ALLOW = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "PYTHONPATH",
    "PYTHONHASHSEED", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "GLIBC_TUNABLES",
)


def engine_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The engine's environment: ``environ`` cut to ``ENGINE_ENV_ALLOW``."""
    return {k: v for k, v in environ.items() if k in ENGINE_ENV_ALLOW}


_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AF_UNIX = 1
_EACCES = 13
_ENOSYS = 38
# (AUDIT_ARCH_*, __NR_socket, __NR_io_uring_setup) per machine.
_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _isolate_network(libc: Any) -> str:
    """A fresh network namespace (only a loopback, down), or why there is none."""
    if libc.unshare(_CLONE_NEWNET) == 0:
        return "netns"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        # Map our own ids so the process keeps its identity. Should the kernel refuse, it
        # still acts with its own ids outside (files stay ours); only getuid() shows nobody.
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            return "userns+netns (ids unmapped)"
        return "userns+netns"
    return f"none ({os.strerror(ctypes.get_errno())})"


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(machine: str) -> bytes | None:
    """The BPF program of the filter (``None`` on a machine we have no syscall table for):
    any syscall of another ABI is refused (x32 included), ``socket(family != AF_UNIX)`` is
    EACCES, ``io_uring_setup`` ENOSYS, everything else allowed."""
    if machine not in _ARCHES:
        return None
    arch, nr_socket, nr_uring = _ARCHES[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    allow, deny = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    prog = [
        _bpf(ld, 0, 0, 4),  # 0: arch
        _bpf(jeq, 1, 0, arch),  # 1: ours -> 3
        _bpf(ret, 0, 0, deny | _ENOSYS),  # 2
        _bpf(ld, 0, 0, 0),  # 3: syscall number
        _bpf(jge, 0, 1, 0x40000000),  # 4: x32 ABI -> 5, else 6
        _bpf(ret, 0, 0, deny | _ENOSYS),  # 5
        _bpf(jeq, 0, 1, nr_uring),  # 6: io_uring_setup -> 7, else 8
        _bpf(ret, 0, 0, deny | _ENOSYS),  # 7
        _bpf(jeq, 0, 3, nr_socket),  # 8: socket -> 9, else 12
        _bpf(ld, 0, 0, 16),  # 9: args[0] (low 32 bits): the family
        _bpf(jeq, 1, 0, _AF_UNIX),  # 10: AF_UNIX -> 12
        _bpf(ret, 0, 0, deny | _EACCES),  # 11
        _bpf(ret, 0, 0, allow),  # 12
    ]
    return b"".join(prog)


def _install_seccomp(libc: Any) -> str:
    program = seccomp_program(platform.machine())
    if program is None:
        return f"none (no syscall table for {platform.machine()})"
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"none ({os.strerror(ctypes.get_errno())})"
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"none ({os.strerror(ctypes.get_errno())})"
    return "seccomp"


def _drop_user(workdir: str, uid: int, gid: int, needed: list[str]) -> str:
    why_not = hand_over(workdir, uid, gid, needed)
    if why_not is not None:
        return f"same ({why_not})"
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return f"uid {uid}"


def apply(workdir: str, engine_user: tuple[int, int] | None, needed: list[str]) -> dict[str, str]:
    """Isolate this (freshly forked, single-threaded) process running the job in ``workdir``;
    returns what applied. ``engine_user``: (uid, gid) to run as where the worker is root;
    ``needed``: paths that user must read (the interpreter, ``sys.path``). Order matters: the
    namespace needs root's capabilities, so it comes before the user change; the filter comes
    last (it forbids nothing the change needs)."""
    libc = _libc()
    applied = {"environment": "allow-list"}
    applied["network_namespace"] = _isolate_network(libc)
    if engine_user is None:
        applied["user"] = "same (not configured)"
    else:
        applied["user"] = _drop_user(workdir, engine_user[0], engine_user[1], needed)
    applied["network_filter"] = _install_seccomp(libc)
    return applied


def _unreadable_for(uid: int, gid: int, paths: list[str]) -> str | None:
    """The first of ``paths`` the user could not read (checked as that user, euid only)."""
    present = [p for p in paths if os.path.exists(p)]  # as root: the user may not even see it
    os.setegid(gid)
    os.seteuid(uid)
    try:
        for path in present:
            if not os.access(path, os.R_OK | os.X_OK, effective_ids=True):
                return path
        return None
    finally:
        os.seteuid(0)
        os.setegid(0)


def hand_over(workdir: str, uid: int, gid: int, needed: list[str]) -> str | None:
    """Give ``workdir`` (the job's files) to ``uid``/``gid`` if that user can run the engine
    (read the interpreter and every path in ``needed``); returns why not, else None."""
    if os.geteuid() != 0:
        return "the worker is not root"
    blocked = _unreadable_for(uid, gid, needed)
    if blocked is not None:
        return f"uid {uid} cannot read {blocked}"
    for root, dirs, files in os.walk(workdir):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)
    os.chown(workdir, uid, gid)
    return None


_PR_SET_DUMPABLE = 4


def protect_worker() -> bool:
    """Make this worker process (and the pool processes it forks) non-dumpable: a process of
    the same user (an engine that kept the worker's uid, as in the k8s pods) can then neither
    ptrace it nor read its ``/proc/<pid>/environ`` and memory, where the credentials are."""
    return bool(_libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
