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
- **files**: a Landlock ruleset (Linux >= 5.13, unprivileged; ``confine_files``): read and
  execute only below what the engine runs from (the interpreter's prefixes, ``sys.path``, the
  directories of loaded modules and shared libraries, ``/usr``, ``/lib*``, ``/etc``, ``/proc``,
  the CPU topology in ``/sys``), read and write only below the job's workdir (its temp dir
  included), ``/dev/shm`` (semaphores of the search's process pool) and ``/dev/null``. Nothing
  that holds the scratch directory is allowed, so the source cache and other jobs' workdirs
  (its siblings) stay out of reach whatever user the engine runs as: this is what keeps them
  from an engine in the k8s pods, which keeps the worker's uid. Where the kernel's ABI has
  them, TCP bind/connect (ABI 4) and signals and abstract unix sockets leaving the engine's
  processes (ABI 6) are refused too. A kernel without Landlock records why
  (``"unavailable: ..."``); the job runs.
- **network**: a new network namespace where the kernel lets us make one (root: CLONE_NEWNET;
  otherwise an unprivileged user namespace with it, which container runtimes' default seccomp
  profiles usually refuse), and a seccomp filter in every case the kernel has seccomp
  (x86_64/aarch64): ``socket()`` of any family but AF_UNIX and ``io_uring_setup`` fail with
  EACCES/ENOSYS. The filter needs only ``no_new_privs``, so it also applies in the k8s pods.

``apply`` returns what applied; the engine writes it into the job's summary (``isolation``)
and the worker logs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import struct
import sys
from collections.abc import Mapping
from typing import Any

from service.child_env import CHILD_ENV_ALLOW, child_environment

# Variables an engine process keeps; everything else (credentials above all) is dropped.
# The engine's environment: the one allow-list of every child that reads a stranger's file.
ENGINE_ENV_ALLOW = CHILD_ENV_ALLOW


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: ``environ`` cut to ``ENGINE_ENV_ALLOW``."""
    return child_environment(environ)


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


# Landlock (linux/landlock.h): the same syscall numbers on x86_64 and aarch64.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute ... make_sym: every right of ABI 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_TCP = 0b11  # bind, connect (ABI 4)
_SCOPE_ALL = 0b11  # abstract unix sockets, signals (ABI 6)
_O_PATH = 0o10000000
# Where any Python process reads its libraries and configuration (ld.so.cache, locale, SSL,
# timezone), CPU counts and topology (glibc, OpenBLAS, ONNX Runtime's cpuinfo and its device
# discovery, which lists /sys/bus/pci), /proc. All of /proc: another process's memory, environment and descriptors are behind ptrace's
# check, which Landlock refuses across domains (each engine has its own).
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/etc", "/proc", "/sys/devices", "/sys/bus",
                "/sys/fs/cgroup", "/dev/urandom", "/dev/random")
# A process pool's semaphores (multiprocessing's SemLock: sem_open makes them in /dev/shm).
_SYSTEM_WRITE = ("/dev/null", "/dev/shm")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi(libc: Any) -> int:
    """The kernel's Landlock ABI version; -errno where it has none (ENOSYS: not built in,
    EOPNOTSUPP: not enabled at boot)."""
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                               ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)))
    return version if version >= 0 else -ctypes.get_errno()


def engine_read_paths() -> list[str]:
    """What the engine runs from: the interpreter's prefixes, every ``sys.path`` entry, the
    directory of every loaded top-level package (an editable install's code is found by a
    finder, not ``sys.path``), the file of every top-level module (``__main__`` included: a
    search's spawned processes run it again) and the directory of every mapped shared
    library, plus ``_SYSTEM_READ``.
    Libraries a job imports later (torch, ORT's providers) sit below ``sys.path`` entries."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.executable,
             *(p for p in sys.path if p), *_SYSTEM_READ]
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." not in name and isinstance(file, str):
            package = os.path.basename(file).startswith("__init__.")
            paths.append(os.path.dirname(file) if package else file)
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.append(os.path.dirname(fields[5].rstrip("\n")))
    return paths


def _covers_or_within(path: str, root: str) -> bool:
    common = os.path.commonpath([path, root])
    return common in (path, root)


def landlock_rules(workdir: str, abi: int) -> list[tuple[str, int]]:
    """(path, allowed access) of the engine's ruleset at ``abi``: ``engine_read_paths`` read
    and execute, the workdir every right, ``_SYSTEM_WRITE`` read and write. A path holding
    the scratch directory (the workdir's parent: the source cache, other jobs' workdirs) or
    inside it is left out, whatever listed it."""
    everything = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    workdir = os.path.realpath(workdir)
    scratch = os.path.dirname(workdir)
    rules: dict[str, int] = {workdir: everything}
    for paths, access in ((engine_read_paths(), _FS_READ),
                          (_SYSTEM_WRITE, everything & ~_FS_EXECUTE & ~_FS_REFER)):
        for path in dict.fromkeys(paths):
            real = os.path.realpath(path)
            if os.path.exists(real) and not _covers_or_within(real, scratch):
                rules[real] = rules.get(real, 0) | access
    # A rule below another that grants at least as much adds nothing (rights are inherited).
    kept: list[tuple[str, int]] = []
    for path, access in sorted(rules.items()):
        if not any(path.startswith(parent.rstrip("/") + "/") and access & ~granted == 0
                   for parent, granted in kept):
            kept.append((path, access))
    return kept


def confine_files(libc: Any, workdir: str) -> str:
    """Restrict this process (and what it starts) to ``landlock_rules``; what applied:
    ``"landlock abi N"``, or why not."""
    abi = landlock_abi(libc)
    if abi < 1:
        return f"unavailable: {os.strerror(-abi)}"
    handled = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) \
        | (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct this ABI knows
    ruleset = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                               ctypes.c_size_t(size), ctypes.c_uint32(0)))
    if ruleset < 0:
        return f"unavailable: {os.strerror(ctypes.get_errno())}"
    try:
        for path, access in landlock_rules(workdir, abi):
            try:
                fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not reachable by this user: nothing to allow
            try:
                if not os.path.isdir(path):
                    access &= _FS_FILE_ONLY
                rule = _PathBeneathAttr(access & handled, fd)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH,
                                ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return f"none (rule for a path refused: {os.strerror(ctypes.get_errno())})"
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"none ({os.strerror(ctypes.get_errno())})"
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            return f"none ({os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    return f"landlock abi {abi}"


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
    namespace needs root's capabilities, so it comes before the user change; Landlock after it
    (the rules are opened as the engine's user); the filter comes last (it forbids nothing the
    others need)."""
    libc = _libc()
    applied = {"environment": "allow-list"}
    applied["network_namespace"] = _isolate_network(libc)
    if engine_user is None:
        applied["user"] = "same (not configured)"
    else:
        applied["user"] = _drop_user(workdir, engine_user[0], engine_user[1], needed)
    applied["filesystem"] = confine_files(libc, workdir)
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
