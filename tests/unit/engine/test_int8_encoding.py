"""int8 encodings chosen for the target's kernels: the rules, and what they protect against.

The suite runs on AVX2-only and on VNNI/AMX hosts alike; these tests give the same answers on
both: profiles are built from /proc/cpuinfo text, and the saturating arithmetic of non-VNNI x86
is computed by ``tests.int8_reference`` instead of by whatever CPU runs the suite.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.engine.devices import get_device, host_profile
from service.engine.devices.cpuid import x86_features
from service.engine.devices.features import canonical, kernel_features, u8s8_saturates
from service.engine.devices.host import profile_from_cpuinfo
from service.engine.int8_encoding import choose_int8_encoding, saturates
from service.engine.registry import PassContext, get_pass
from tests.int8_reference import cosine, dynamic_int8_matmul, quantized_weight, saturation_prone_mlp

_MEM = "MemTotal: 8000000 kB\n"


def _x86(flags: str) -> object:
    return profile_from_cpuinfo(f"processor : 0\nmodel name : test\nflags : {flags}\n\n", _MEM,
                                "x86_64", 2)


AVX2_HOST = _x86("sse4_2 avx avx2 fma f16c")
VNNI_HOST = _x86("sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni")


def test_feature_vocabulary_is_one() -> None:
    assert canonical(["asimddp", "ASIMDHP", "asimd", "avx512_vnni"]) == {
        "dotprod", "fp16", "neon", "avx512_vnni"}
    assert kernel_features("x86_64", ["avx2", "sse4_2", "avx512vl"]) == {"avx2"}
    assert u8s8_saturates("x86_64", ["avx2", "fma"])
    assert u8s8_saturates("x86_64", ["avx512f", "avx512bw"])  # Skylake-SP: vpmaddubsw too
    assert not u8s8_saturates("x86_64", ["avx2", "avx_vnni"])  # Alder Lake AVX-VNNI
    assert not u8s8_saturates("x86_64", ["amx_int8"])
    assert not u8s8_saturates("arm64", ["neon"])  # widening multiplies, no int16 step


def test_every_cpu_profile_states_its_kernel_features() -> None:
    for name in ("amd_epyc_9654", "x86_laptop_avx2", "x86_xeon_spr_vnni_amx"):
        assert "avx2" in kernel_features("x86_64", get_device(name).isa_features), name
    for name in ("raspberry_pi_4", "raspberry_pi_5", "pixel_8", "apple_m2"):
        assert "neon" in kernel_features("arm64", get_device(name).isa_features), name
    assert saturates(get_device("x86_laptop_avx2"))
    assert not saturates(get_device("x86_xeon_spr_vnni_amx"))
    assert not saturates(get_device("amd_epyc_9654"))
    assert not saturates(get_device("nvidia_t4"))


def test_host_profile_reads_the_kernels_view() -> None:
    assert AVX2_HOST.isa_features == ("sse4_2", "avx", "avx2", "fma", "f16c")
    # cpuid replaces the text file's vector flags (an emulator or a masking hypervisor).
    masked = profile_from_cpuinfo("processor : 0\nflags : avx2 avx512f avx512_vnni fma\n\n",
                                  _MEM, "x86_64", 2, cpuid_features=frozenset({"avx2", "fma"}))
    assert "avx512_vnni" not in masked.isa_features and saturates(masked)
    assert masked.quant_formats[0] == "int8_reduce_range"
    arm = profile_from_cpuinfo("processor : 0\nFeatures : fp asimd asimdhp asimddp i8mm\n\n",
                               _MEM, "aarch64", 4)
    assert {"neon", "fp16", "dotprod", "i8mm"} <= set(arm.isa_features)


@pytest.mark.skipif(x86_features() is None, reason="not an x86 host")
def test_cpuid_agrees_with_the_kernel_on_this_cpu() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    features = x86_features()
    assert features is not None
    assert ("avx2" in features) == ("avx2" in flags)
    assert ("fma" in features) == ("fma" in flags)
    # The host profile carries what cpuid says.
    assert ("avx2" in host_profile().isa_features) == ("avx2" in features)


def test_encoding_rules() -> None:
    laptop, spr = get_device("x86_laptop_avx2"), get_device("x86_xeon_spr_vnni_amx")
    pi5, t4 = get_device("raspberry_pi_5"), get_device("nvidia_t4")
    # The target saturates: 7-bit weights, whatever measures the job.
    for host in (AVX2_HOST, VNNI_HOST):
        enc = choose_int8_encoding(None, weight_type="int8", target=laptop, host=host)
        assert enc.reduce_range and enc.weight_max == 64 and "vpmaddubsw" in enc.reason
    # A VNNI target measured on a VNNI host: full range.
    enc = choose_int8_encoding(None, weight_type="int8", target=spr, host=VNNI_HOST)
    assert not enc.reduce_range and enc.weight_max == 127
    # ... measured on an AVX2-only host: 7-bit, so the measured fidelity is the target's.
    enc = choose_int8_encoding(None, weight_type="int8", target=spr, host=AVX2_HOST)
    assert enc.reduce_range and "host" in enc.reason and enc.host_saturates
    # The host itself (no target): its own kernels decide.
    assert choose_int8_encoding(None, weight_type="int8", target=None, host=AVX2_HOST).reduce_range
    assert not choose_int8_encoding(None, weight_type="int8", target=None,
                                    host=VNNI_HOST).reduce_range
    for target in (pi5, t4):
        assert not choose_int8_encoding(None, weight_type="int8", target=target,
                                        host=VNNI_HOST).reduce_range
    # uint8 weights (u8u8 kernels) never saturate.
    assert not choose_int8_encoding(None, weight_type="uint8", target=laptop,
                                    host=AVX2_HOST).reduce_range
    # An explicit choice wins, and one known to saturate is said so.
    enc = choose_int8_encoding(False, weight_type="int8", target=laptop, host=VNNI_HOST)
    assert not enc.reduce_range and enc.warning and "laptop" in enc.warning
    assert choose_int8_encoding(True, weight_type="int8", target=spr,
                                host=VNNI_HOST).warning is None


@pytest.mark.parametrize("target,host", [("x86_laptop_avx2", VNNI_HOST),
                                         ("x86_laptop_avx2", AVX2_HOST),
                                         ("host", AVX2_HOST)])
def test_non_vnni_target_keeps_accuracy_where_full_range_saturates(
    tmp_path: Path, target: str, host: object
) -> None:
    model, x, ref = saturation_prone_mlp()
    labels = ref.argmax(axis=1)

    def quantize(target_profile: object, host_profile_: object) -> tuple[onnx.ModelProto, dict]:
        ctx = PassContext(workdir=tmp_path / f"w{len(list(tmp_path.iterdir()))}",
                          target=target_profile, host=host_profile_)  # type: ignore[arg-type]
        ctx.workdir.mkdir()
        cls = get_pass("quantize_dynamic")
        out = cls().run(model, cls.config_model(per_channel=False), ctx)
        return out, ctx.notes

    tgt = host if target == "host" else get_device(target)
    chosen, notes = quantize(None if target == "host" else tgt, host)
    assert notes["encoding"]["reduce_range"] is True
    w_q, w_s, w_zp = quantized_weight(chosen)
    assert int(np.abs(w_q.astype(np.int32)).max()) <= 64  # no u8 x s8 pair can pass 32767
    on_avx2 = dynamic_int8_matmul(x, w_q, w_s, w_zp, saturate_pairs=True)
    exact = dynamic_int8_matmul(x, w_q, w_s, w_zp, saturate_pairs=False)
    np.testing.assert_array_equal(on_avx2, exact)  # the saturating kernel changes nothing
    assert cosine(on_avx2, ref) >= 0.999
    assert (on_avx2.argmax(axis=1) == labels).mean() >= 0.95

    # What the rule protects against: the full-range encoding a VNNI target gets, run by the
    # saturating kernel, loses accuracy on the same inputs.
    full, full_notes = quantize(get_device("x86_xeon_spr_vnni_amx"), VNNI_HOST)
    assert full_notes["encoding"]["reduce_range"] is False
    f_q, f_s, f_zp = quantized_weight(full)
    assert int(np.abs(f_q.astype(np.int32)).max()) == 127
    clipped = dynamic_int8_matmul(x, f_q, f_s, f_zp, saturate_pairs=True)
    unclipped = dynamic_int8_matmul(x, f_q, f_s, f_zp, saturate_pairs=False)
    assert cosine(unclipped, ref) >= 0.999  # fine where products accumulate in 32 bits
    assert cosine(clipped, ref) < cosine(on_avx2, ref) - 0.001
    assert (clipped.argmax(axis=1) == labels).mean() < (on_avx2.argmax(axis=1) == labels).mean()


def test_reference_matches_this_hosts_kernels(tmp_path: Path) -> None:
    """The reference above is ONNX Runtime's arithmetic: on this host, with full-range weights,
    ORT's output equals the reference for this host's kernels (saturating on AVX2-only x86,
    exact with VNNI/AMX or on Arm) - on whichever CPU the suite runs."""
    import onnxruntime as ort

    model, x, ref = saturation_prone_mlp()
    ctx = PassContext(workdir=tmp_path, target=None, host=host_profile())
    cls = get_pass("quantize_dynamic")
    full = cls().run(model, cls.config_model(per_channel=False, reduce_range=False), ctx)
    path = tmp_path / "full.onnx"
    onnx.save_model(full, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w_q, w_s, w_zp = quantized_weight(full)
    expected = dynamic_int8_matmul(x, w_q, w_s, w_zp, saturate_pairs=saturates(host_profile()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


_EMULATED_CHECK = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from service.engine.devices import host_profile
from service.engine.int8_encoding import saturates
from service.engine.registry import PassContext, get_pass
from tests.int8_reference import cosine, dynamic_int8_matmul, quantized_weight, saturation_prone_mlp
model, x, ref = saturation_prone_mlp()
out = {"features": list(host_profile().isa_features), "saturates": saturates(host_profile())}
for label, requested in (("chosen", None), ("full_range", False)):
    work = Path(tempfile.mkdtemp())
    ctx = PassContext(workdir=work)
    cls = get_pass("quantize_dynamic")
    q = cls().run(model, cls.config_model(per_channel=False, reduce_range=requested), ctx)
    onnx.save_model(q, str(work / "q.onnx"))
    y = ort.InferenceSession(str(work / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    w_q, w_s, w_zp = quantized_weight(q)
    sat = dynamic_int8_matmul(x, w_q, w_s, w_zp, saturate_pairs=True)
    out[label] = {"reduce_range": ctx.notes["encoding"]["reduce_range"],
                  "cosine": cosine(y, ref), "max_abs_vs_reference": float(np.abs(y - sat).max())}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user on x86_64 (scripts/install_tools.sh installs it)")
def test_on_an_emulated_avx2_only_cpu(tmp_path: Path) -> None:
    """ONNX Runtime on an AVX2-only EPYC (Zen 2), emulated by qemu-user whatever this CPU is:
    the host profile sees no VNNI, the pass picks 7-bit weights, and the result is accurate,
    while full-range weights there give exactly the saturating reference's arithmetic."""
    repo = Path(__file__).resolve().parents[3]
    script = tmp_path / "check.py"
    script.write_text(_EMULATED_CHECK)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["qemu-x86_64", "-cpu", "EPYC-Rome", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=600, cwd=repo, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(line[len("RESULT "):])
    assert "avx2" in out["features"] and "avx512_vnni" not in out["features"]
    assert out["saturates"] is True
    assert out["chosen"]["reduce_range"] is True and out["chosen"]["cosine"] >= 0.999
    assert out["full_range"]["reduce_range"] is False
    assert out["full_range"]["max_abs_vs_reference"] < 1e-3  # ORT there == saturating reference
    assert out["full_range"]["cosine"] < out["chosen"]["cosine"] - 0.005
