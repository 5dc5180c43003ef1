"""The x86 CPU's own feature report (``cpuid`` and ``xgetbv``), as ONNX Runtime's MLAS sees it.

``/proc/cpuinfo`` is usually the same list, but not always: an emulator (``qemu-x86_64 -cpu
Haswell``), a hypervisor that masks features from guests, or an OS that has not enabled the
AVX-512 register state makes the kernels' view differ from the text file. MLAS decides with
``cpuid`` and ``xgetbv``, so the host profile does too, and falls back to ``/proc/cpuinfo``
where executing these instructions is impossible (another architecture, no executable memory).

The two instructions run from a few bytes of machine code placed in an anonymous executable
mapping and called through ctypes (the same technique as the py-cpuinfo package). Standard
library only.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from functools import cache
from typing import Any

# cpuid(leaf=edi, subleaf=esi, out=rdx): push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID = bytes.fromhex("5389f889f14989d00fa24189004189580441894808" "4189500c5bc3")
# xgetbv(ecx=edi) -> edx:eax in rax: mov ecx,edi; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV = bytes.fromhex("89f90f01d048c1e2204809d0c3")

# (leaf, subleaf, register index 0..3 = eax, ebx, ecx, edx, bit) -> canonical feature name.
_BITS = {
    "fma": (1, 0, 2, 12),
    "avx": (1, 0, 2, 28),
    "f16c": (1, 0, 2, 29),
    "avx2": (7, 0, 1, 5),
    "avx512f": (7, 0, 1, 16),
    "avx512bw": (7, 0, 1, 30),
    "avx512vl": (7, 0, 1, 31),
    "avx512_vnni": (7, 0, 2, 11),
    "avx512_fp16": (7, 0, 3, 23),
    "amx_bf16": (7, 0, 3, 22),
    "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25),
    "avx_vnni": (7, 1, 0, 4),
    "avx512_bf16": (7, 1, 0, 5),
}
_AVX_STATE = 0b110  # XCR0: SSE and AVX (ymm) state enabled by the OS
_AVX512_STATE = 0b11100000  # opmask, zmm hi256, hi16 zmm
_AMX_STATE = 0b11 << 17  # tile config, tile data


def _function(code: bytes, restype: Any, *argtypes: Any) -> tuple[mmap.mmap, Any]:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return page, ctypes.CFUNCTYPE(restype, *argtypes)(address)


@cache
def x86_features() -> frozenset[str] | None:
    """Canonical feature names from ``cpuid``/``xgetbv``; None where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpuid_page, cpuid = _function(_CPUID, None, ctypes.c_uint32, ctypes.c_uint32,
                                      ctypes.POINTER(ctypes.c_uint32))
        xgetbv_page, xgetbv = _function(_XGETBV, ctypes.c_uint64, ctypes.c_uint32)
    except (OSError, ValueError, AttributeError, TypeError):  # no executable mapping allowed
        return None
    try:
        regs = (ctypes.c_uint32 * 4)()

        def read(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
            cpuid(leaf, subleaf, regs)
            return regs[0], regs[1], regs[2], regs[3]

        max_leaf = read(0, 0)[0]
        leaves = {(1, 0): read(1, 0)}
        if max_leaf >= 7:
            leaves[(7, 0)] = read(7, 0)
            if leaves[(7, 0)][0] >= 1:
                leaves[(7, 1)] = read(7, 1)
        found = {name for name, (leaf, sub, reg, bit) in _BITS.items()
                 if (leaf, sub) in leaves and leaves[(leaf, sub)][reg] >> bit & 1}
        osxsave = leaves[(1, 0)][2] >> 27 & 1
        xcr0 = int(xgetbv(0)) if osxsave else 0
    finally:
        cpuid_page.close()
        xgetbv_page.close()
    # A feature the OS has not enabled the registers for is not usable (MLAS checks the same).
    if xcr0 & _AVX_STATE != _AVX_STATE:
        found -= {"avx", "avx2", "fma", "f16c", "avx_vnni"}
    if xcr0 & _AVX512_STATE != _AVX512_STATE:
        found = {f for f in found if not f.startswith("avx512")}
    if xcr0 & _AMX_STATE != _AMX_STATE:
        found = {f for f in found if not f.startswith("amx")}
    return frozenset(found)
