"""Committed benchmark output: a header naming the machine, then the tables the script prints.

Every figure the README quotes comes from a file under ``docs/bench/`` written by
``scripts/bench_*.py --out docs/bench/NAME.txt``. The header says where and when the numbers
were measured (CPU model, the ISA flags the kernels use, usable cores, the threads the
benchmark ran with, date, commit), so a reader can tell whether they still describe the code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from service.engine.devices.host import usable_cores

ROOT = Path(__file__).resolve().parents[1]

# The flags that decide which kernels ONNX Runtime runs (the rest of /proc/cpuinfo is noise).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                "amx_tile", "amx_int8", "amx_bf16", "asimddp", "asimdhp", "fphp", "sve")


def _cpu() -> tuple[str, list[str]]:
    """(model name, kernel-relevant flags) from /proc/cpuinfo; platform's guess elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    name = (fields.get("model name") or fields.get("cpu model") or fields.get("hardware")
            or platform.machine())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return name, [f for f in KERNEL_FLAGS if f in flags]


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if not head:
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def machine_header(script: str, argv: list[str], threads: str,
                   now: dt.datetime | None = None) -> str:
    """The header of a committed output: command, date, commit, CPU, cores and ``threads``
    (the benchmark's own words for the threads/processes it ran with). Lines start with ``#``."""
    name, flags = _cpu()
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"command: {' '.join([script, *argv])}",
        f"date: {when}",
        f"commit: {_commit()}",
        f"cpu: {name} ({platform.machine()}); kernel flags: {' '.join(flags) or 'none listed'}",
        f"cores: {usable_cores()} usable (os.cpu_count {os.cpu_count()})",
        f"threads: {threads}",
        f"python: {platform.python_version()}",
    ]
    return "".join(f"# {line}\n" for line in lines)


class _Tee:
    """A text stream writing to the terminal and to the output file."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def tee_to(path: Path | None, header: str) -> Iterator[None]:
    """While inside, what the script prints also goes to ``path``, after ``header``
    (nothing is written when ``path`` is None). The file is complete only when the block
    ends; a benchmark that raises still leaves what it printed."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.write(header + "\n")
        previous = sys.stdout
        sys.stdout = _Tee(previous, fh)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = previous
