"""The ``host`` profile: this machine's CPU, read from ``/proc/cpuinfo`` and ``/proc/meminfo``.

Peak throughput is derived from the cores this process may use, the clock and the widest vector
unit the flags show; memory bandwidth and power are not readable from the OS: bandwidth is a
per-core figure measured on one machine, power a documented estimate (``sources`` says so). ``service.engine.cost_model.calibrate_host`` fits an
efficiency factor against measured ONNX Runtime latency, which absorbs the error of these guesses.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

from service.engine.devices.features import canonical, u8s8_saturates
from service.engine.devices.profile import DeviceProfile

# Features worth showing, in the canonical vocabulary of ``features`` (the rest of
# /proc/cpuinfo is noise for inference).
_INTERESTING = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2",
)
# What cpuid can report (x86): these come from the instruction, not the text file.
_CPUID_OWNED = frozenset({
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
})
# What the OS does not tell (documented in the profile's sources; derivations in
# service/engine/devices/cost_sources.json). Bandwidth per core: MEASURED on the machine the
# CPU fit was made on (an AMD EPYC, Zen 5, under KVM): the DRAM bandwidth one core draws
# through ONNX Runtime's Add kernel, bytes counted as the cost model counts them
# (scripts/measure_cpu_constants.py, output docs/bench/cpu_constants.txt). It is a constant,
# not measured at run time (a measurement is neither cheap nor repeatable on a shared host):
# other CPUs get this machine's figure per core, and the fitted memory efficiency absorbs the
# difference. Power per core: SOURCED, the median TDP / cores of the x86 profiles' vendor
# pages (EPYC 9654 3.75, Xeon 8480+ 6.25, i7-8565U 3.75).
_GBPS_PER_CORE = 40.0
_WATTS_PER_CORE = 3.75


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {key: value}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def profile_from_cpuinfo(
    cpuinfo: str, meminfo: str, machine: str, cores: int,
    cpuid_features: frozenset[str] | None = None,
) -> DeviceProfile:
    """Build a host profile from the text of /proc/cpuinfo and /proc/meminfo (testable).

    ``cpuid_features`` (x86: what ``cpuid``/``xgetbv`` report, see ``devices.cpuid``) replaces
    the vector features of the text file: ONNX Runtime picks its kernels by the instruction.
    """
    info = _cpuinfo_fields(cpuinfo)
    flags = set(canonical((info.get("flags") or info.get("features") or "").split()))
    if cpuid_features is not None:
        flags = (flags - _CPUID_OWNED) | set(cpuid_features)
        feature_source = "cpuid/xgetbv (what ONNX Runtime's kernels dispatch on)"
    else:
        feature_source = "/proc/cpuinfo flags"
    arm = machine.lower() in ("aarch64", "arm64")
    architecture = "arm64" if arm else ("x86_64" if machine in ("x86_64", "AMD64") else "other")
    try:
        ghz = float(info.get("cpu mhz", "")) / 1000.0
    except ValueError:
        ghz = 0.0
    clock_note = f"{ghz:.2f} GHz from /proc/cpuinfo"
    if ghz <= 0:
        ghz = 2.0
        clock_note = "clock not in /proc/cpuinfo, assumed 2.0 GHz"
    if arm:
        flops_cycle, width = 16.0, "2 x 128-bit NEON FMA pipes"
    elif "avx512f" in flags:
        flops_cycle, width = 64.0, "2 AVX-512 FMA units"
    elif "avx2" in flags and "fma" in flags:
        flops_cycle, width = 32.0, "2 AVX2 FMA units"
    else:
        flops_cycle, width = 8.0, "SSE, no FMA"
    fp32 = cores * ghz * flops_cycle
    vnni = "dotprod" in flags if arm else (
        architecture == "x86_64" and not u8s8_saturates(architecture, flags))
    # ONNX Runtime's int8 kernels reach a few times the fp32 rate with dot-product instructions
    # (VNNI, AMX, sdot) and about twice without; the AMX peak itself is far beyond what small
    # inference GEMMs see, so it is not credited here.
    int8_factor = 4.0 if vnni else 2.0
    peaks: dict[str, float] = {"fp32": round(fp32, 1), "int8": round(fp32 * int8_factor, 1)}
    precisions = ["fp32", "int8", "int4"]
    peaks["int4"] = peaks["fp32"]
    fp16_fast = arm and "fp16" in flags
    if fp16_fast:
        peaks["fp16"] = round(fp32 * 2, 1)
        precisions.append("fp16")
    if arm or vnni:
        formats = [
            "int8_static_qdq_u8s8",
            "int8_static_qdq_s8s8",
            "int8_dynamic",
            "int4_weight_only",
        ]
    else:
        formats = ["int8_reduce_range", "int8_dynamic", "int8_static_qdq_u8s8", "int4_weight_only"]
    if fp16_fast:
        formats.append("fp16")
    mem_kb = 0.0
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            try:
                mem_kb = float(line.split()[1])
            except (IndexError, ValueError):
                mem_kb = 0.0
    memory_mb = round(mem_kb / 1024.0, 1) if mem_kb > 0 else 1024.0
    model_name = info.get("model name") or info.get("cpu model") or info.get("hardware") or machine
    derived = f"derived: {cores} usable cores x {clock_note} x {flops_cycle:g} FLOP/cycle ({width})"
    return DeviceProfile(
        name="host",
        title=f"This machine: {model_name} ({cores} usable cores)",
        kind="cpu",
        vendor=info.get("vendor_id") or info.get("cpu implementer") or "unknown",
        architecture=architecture,  # type: ignore[arg-type]
        isa_features=tuple(f for f in _INTERESTING if f in flags),
        execution_providers=("CPUExecutionProvider",),
        precisions=tuple(precisions),  # type: ignore[arg-type]
        quant_formats=tuple(formats),  # type: ignore[arg-type]
        cores=cores,
        memory_mb=memory_mb,
        storage_budget_mb=max(1.0, round(memory_mb / 4, 1)),
        peak_gops=peaks,  # type: ignore[arg-type]
        memory_bandwidth_gbps=round(cores * _GBPS_PER_CORE, 1),
        typical_power_w=round(cores * _WATTS_PER_CORE, 1),
        sources={
            "isa_features": feature_source,
            "cores": "CPUs this process may run on (sched_getaffinity)",
            "memory_mb": "MemTotal in /proc/meminfo",
            "storage_budget_mb": "EdgePress default: a quarter of memory",
            "peak_gops.fp32": derived,
            "peak_gops.int8": f"{int8_factor:g}x fp32 ({'dot-product instructions' if vnni else 'no dot-product instructions'} in the cpuinfo flags)",
            "peak_gops.int4": "no native int4 compute (MatMulNBits dequantizes to fp32)",
            **({"peak_gops.fp16": "2x fp32 (fp16 arithmetic flags)"} if fp16_fast else {}),
            "memory_bandwidth_gbps": f"{_GBPS_PER_CORE:g} GB/s per usable core: the DRAM bandwidth one core drew through ONNX Runtime on the AMD EPYC the CPU fit was made on (scripts/measure_cpu_constants.py, docs/bench/cpu_constants.txt); not readable from the OS",
            "typical_power_w": f"estimate: {_WATTS_PER_CORE:g} W per usable core (not readable from the OS; median TDP per core of the x86 profiles, service/engine/devices/cost_sources.json)",
        },
        notes="Built at run time from /proc/cpuinfo; the cost model's host calibration corrects the estimates.",
    )


@cache
def host_profile() -> DeviceProfile:
    """The profile of this machine's CPU (computed once per process)."""
    from service.engine.devices.cpuid import x86_features

    return profile_from_cpuinfo(
        _read("/proc/cpuinfo"), _read("/proc/meminfo"), platform.machine(), usable_cores(),
        cpuid_features=x86_features(),
    )


def process_memory_kb() -> dict[str, int]:
    """This process's memory lines of ``/proc/self/status`` in kB (``VmRSS`` now, ``VmHWM`` its
    peak since exec, ``RssAnon``, ``RssFile`` ...); {} where there is no such file."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def memory_limit() -> tuple[int, int] | None:
    """(limit, used) in bytes: this process's memory limit, ``RLIMIT_DATA`` (its private
    writable memory: heap, anonymous and private writable mappings, thread stacks), and what
    counts against it now (``VmData``); None without a limit. The worker limits jobs this way,
    not by address space: read-only mappings of a model's weight files (page cache, shared,
    reclaimable) would count against an address-space limit whether resident or not."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY:
        return None
    used = process_memory_kb().get("VmData")
    return (soft, used * 1024) if used is not None else None
