"""The device catalogue: real profiles with sourced numbers, lookup, custom profiles, host."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.engine.devices import (
    DeviceProfile,
    get_device,
    host_profile,
    list_devices,
    parse_device,
)
from service.engine.devices.host import profile_from_cpuinfo
from service.engine.errors import EngineError

REQUIRED_TARGETS = {
    "x86_xeon_spr_vnni_amx", "x86_laptop_avx2", "amd_epyc_9654", "raspberry_pi_4",
    "raspberry_pi_5", "apple_m2", "snapdragon_8_gen3", "pixel_8", "jetson_orin_nano",
    "nvidia_t4", "nvidia_l4", "nvidia_a100", "intel_core_ultra_npu",
}


def test_catalogue_has_the_real_targets_and_host() -> None:
    names = [p.name for p in list_devices()]
    assert set(names) >= REQUIRED_TARGETS
    assert "host" in names
    assert len(names) == len(set(names)) >= 13
    assert names == sorted(names)


@pytest.mark.parametrize("profile", [p for p in list_devices() if p.name != "host"], ids=lambda p: p.name)
def test_every_number_has_a_source(profile: DeviceProfile) -> None:
    assert profile.missing_sources() == []
    for key, source in profile.sources.items():
        assert len(source) > 10, key
    # a profile's fast precisions are the ones it gives a peak for, fp32 at least
    assert "fp32" in profile.peak_gops
    assert profile.peak("int8") >= profile.peak("fp32") or "int8" not in profile.precisions


def test_profiles_say_what_runs_fast() -> None:
    t4, spr, laptop = get_device("nvidia_t4"), get_device("x86_xeon_spr_vnni_amx"), get_device("x86_laptop_avx2")
    qnn = get_device("snapdragon_8_gen3")
    assert "TensorrtExecutionProvider" in t4.execution_providers
    assert t4.runs_fast("int8_static_qdq_s8s8") and t4.runs_fast("fp16")
    assert not t4.runs_fast("int8_static_qdq_u8s8") and not t4.runs_fast("int8_dynamic")
    assert spr.runs_fast("int8_static_qdq_u8s8") and not spr.runs_fast("fp16")
    assert "avx512_vnni" in spr.isa_features and "amx_int8" in spr.isa_features
    assert laptop.runs_fast("int8_reduce_range") and "avx512_vnni" not in laptop.isa_features
    assert qnn.static_shapes and qnn.runs_fast("int16_static_qdq_u16u8")
    assert "CoreMLExecutionProvider" in get_device("apple_m2").execution_providers


def test_profile_files_round_trip_json() -> None:
    for profile in list_devices():
        again = DeviceProfile.model_validate(json.loads(profile.model_dump_json()))
        assert again == profile


def test_get_device_unknown_name() -> None:
    assert get_device("NVIDIA_T4").name == "nvidia_t4"
    with pytest.raises(EngineError) as info:
        get_device("tpu_v9")
    assert info.value.code == "unknown_device"
    assert "nvidia_t4" in info.value.details["known"]


def test_parse_device_name_and_custom() -> None:
    assert parse_device("raspberry_pi_5") == get_device("raspberry_pi_5")
    assert parse_device({"name": "nvidia_l4"}) == get_device("nvidia_l4")
    assert parse_device({"name": "host"}).name == "host"
    small = parse_device({"extends": "raspberry_pi_5", "name": "pi5_2gb", "memory_mb": 2048})
    assert small.name == "pi5_2gb" and small.memory_mb == 2048
    assert "memory_mb" not in small.sources  # the override has no datasheet behind it
    full = get_device("nvidia_t4").model_dump()
    full["name"] = "my_gpu"
    assert parse_device(full).name == "my_gpu"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"extends": "nvidia_t4", "kind": "tpu"}, "kind"),
        ({"extends": "nvidia_t4", "memory_mb": -1}, "memory_mb"),
        ({"extends": "nvidia_t4", "peak_gops": {"int8": 5}}, "peak_gops"),
        ({"extends": "nvidia_t4", "quant_formats": ["int3_magic"]}, "quant_formats.0"),
        ({"extends": "nvidia_t4", "precisions": ["fp32", "int4"], "peak_gops": {"fp32": 1}}, "device"),
        ({"extends": "nvidia_t4", "name": "../etc"}, "name"),
        ({"extends": "nvidia_t4", "surprise": 1}, "surprise"),
        ({"name": "x", "kind": "cpu"}, "title"),
    ],
)
def test_parse_device_invalid(value: dict, field: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_device(value)
    assert info.value.code == "invalid_device"
    assert field in [e["field"] for e in info.value.details["errors"]]


def test_parse_device_wrong_type() -> None:
    with pytest.raises(EngineError) as info:
        parse_device(42)  # type: ignore[arg-type]
    assert info.value.code == "invalid_device"


def test_host_profile_reflects_this_cpu() -> None:
    host = host_profile()
    assert host.name == "host" and host.kind == "cpu"
    with open("/proc/cpuinfo") as handle:
        flags = handle.read()
    assert ("avx512_vnni" in flags) == ("avx512_vnni" in host.isa_features)
    assert host.peak_gops["fp32"] > 0 and host.memory_mb > 0


def test_host_profile_without_vnni_uses_reduce_range() -> None:
    cpuinfo = "processor : 0\nmodel name : Old Laptop\ncpu MHz : 1800.0\nflags : sse4_2 avx avx2 fma\n\n"
    profile = profile_from_cpuinfo(cpuinfo, "MemTotal: 8000000 kB\n", "x86_64", 4)
    assert profile.quant_formats[0] == "int8_reduce_range"
    assert profile.peak_gops["fp32"] == pytest.approx(4 * 1.8 * 32)
    arm = profile_from_cpuinfo("processor : 0\nFeatures : asimd asimdhp asimddp\n", "", "aarch64", 4)
    assert arm.architecture == "arm64" and "fp16" in arm.precisions


def test_devices_package_imports_no_heavy_library() -> None:
    code = (
        "import sys; import service.engine.devices as d; d.list_devices(); "
        "bad = [m for m in ('onnx', 'onnxruntime', 'torch', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_profile_whose_isa_differs_from_the_hosts_is_never_measured() -> None:
    """Each kernel-selecting feature the host lacks (added to a copy of the host's profile)
    and each it has (taken away) makes the copy a target the host cannot stand for: not
    "measured" (recipe jobs' measurement note), latency at the first thread count only."""
    from service.engine.devices.features import KERNEL_FEATURES
    from service.engine.evaluate import latency_thread_counts
    from service.engine.limits import EngineLimits
    from service.engine.recipe import measurement_note

    host = host_profile()
    twin = host.model_copy(update={"name": "twin"})
    assert host.same_kernels_as(twin) and measurement_note(twin)["host_is_target"] is True
    kernel = KERNEL_FEATURES.get(host.architecture, frozenset())
    variants = [(f, (*host.isa_features, f)) for f in sorted(kernel - set(host.isa_features))]
    variants += [(f, tuple(x for x in host.isa_features if x != f))
                 for f in sorted(kernel & set(host.isa_features))]
    assert variants
    for feature, isa in variants:
        other = host.model_copy(update={"name": "other", "isa_features": isa})
        assert not other.same_kernels_as(host), feature
        note = measurement_note(other)
        assert note["host_is_target"] is False and "estimate" in note["note"], feature
        assert latency_thread_counts(EngineLimits(), other) == [1], feature
