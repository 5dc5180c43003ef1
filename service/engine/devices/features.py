"""CPU features that decide which ONNX Runtime kernels run, in one vocabulary.

``/proc/cpuinfo`` (x86: ``avx512_vnni``; arm64: ``asimddp``), ``cpuid`` and the catalogue
profiles name the same things differently. Every profile's ``isa_features`` is compared in the
canonical names below, so that "can this host stand for that target" and "does u8s8 int8
saturate there" have one answer.

Which features matter (ONNX Runtime's MLAS picks its kernels by them):

- x86 int8 GEMM/conv: ``amx_int8`` (AMX tiles), ``avx512_vnni`` / ``avx_vnni`` (``vpdpbusd``,
  32-bit accumulation), else ``avx512bw`` / ``avx2`` with ``vpmaddubsw``, whose int16
  intermediate saturates when two adjacent u8 x s8 products add past 32767.
- x86 float: ``avx512f``, ``avx2`` + ``fma``; ``avx512_bf16`` / ``amx_bf16``; ``avx512_fp16``.
- arm64: ``dotprod`` (``sdot``/``udot``), ``i8mm`` (``smmla``), ``fp16`` (half-precision
  arithmetic), ``bf16``, ``sve``.

This module imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable

# /proc/cpuinfo and vendor spellings -> canonical names.
ALIASES = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "svebf16": "bf16",
    "svei8mm": "i8mm",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "amx-int8": "amx_int8",
    "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16",
}

# The features ONNX Runtime's CPU kernels dispatch on, per architecture. Two CPUs with the same
# subset run the same kernels (up to core count, clock and caches).
KERNEL_FEATURES = {
    "x86_64": frozenset({
        "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
        "avx512_fp16", "amx_int8", "amx_bf16",
    }),
    "arm64": frozenset({"neon", "dotprod", "i8mm", "fp16", "bf16", "sve"}),
}

# Dot-product instructions that accumulate u8 x s8 in 32 bits (no int16 intermediate).
_X86_INT8_DOT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def canonical(features: Iterable[str]) -> frozenset[str]:
    """``features`` in the canonical vocabulary (lowercase, aliases resolved)."""
    out = set()
    for feature in features:
        name = feature.strip().lower()
        out.add(ALIASES.get(name, name))
    return frozenset(out)


def kernel_features(architecture: str, features: Iterable[str]) -> frozenset[str]:
    """The subset of ``features`` that selects ONNX Runtime CPU kernels on ``architecture``."""
    return canonical(features) & KERNEL_FEATURES.get(architecture, frozenset())


def u8s8_saturates(architecture: str, features: Iterable[str]) -> bool:
    """Whether int8 (u8 activations x s8 weights) GEMMs saturate in int16 on this CPU.

    True on x86 without VNNI/AMX: ONNX Runtime multiplies with ``vpmaddubsw`` there, which adds
    two u8 x s8 products into a saturating int16 (255 x 127 x 2 = 64770 > 32767). 7-bit weights
    (``reduce_range``) keep every pair within 255 x 64 x 2 = 32640. Arm's widening multiplies
    and dot products, VNNI and AMX accumulate in 32 bits.
    """
    return architecture == "x86_64" and not (canonical(features) & _X86_INT8_DOT)


def describe(architecture: str, features: Iterable[str]) -> str:
    """A short human description of the kernel-relevant features, e.g. ``"avx2, fma"``."""
    kernel = sorted(kernel_features(architecture, features))
    return ", ".join(kernel) if kernel else f"baseline {architecture} (no vector extensions listed)"


# Instructions with which ONNX Runtime's MatMulNBits kernels (MLAS SQNBitGemm) compute int4 x
# int8 products (``accuracy_level`` 4): VNNI/AMX and AVX-512 on x86, the dot products on arm64.
_INT8_COMPUTE = {
    "x86_64": frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx512bw"}),
    "arm64": frozenset({"dotprod", "i8mm"}),
}


def int8_compute_features(architecture: str, features: Iterable[str]) -> frozenset[str]:
    """The features of this CPU that give MatMulNBits a fast int8 compute path (empty: none)."""
    return canonical(features) & _INT8_COMPUTE.get(architecture, frozenset())
