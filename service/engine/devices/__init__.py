"""The device catalogue: target profiles for hardware-aware compression.

Public functions (the API serves them as ``GET /v1/devices`` and ``GET /v1/devices/{name}``):

- ``list_devices()``: every catalogue profile plus ``host`` (this machine's CPU), sorted by name.
- ``get_device(name)``: one profile; ``EngineError("unknown_device")`` if there is none.
- ``parse_device(value)``: a job's ``device`` field, either a profile name or an inline custom
  profile (a dict with every ``DeviceProfile`` field, or ``{"extends": "<name>", ...overrides}``);
  ``EngineError("invalid_device")`` with per-field errors when it does not validate.
- ``host_profile()``: the profile of the machine this code runs on, read from ``/proc/cpuinfo``.

Catalogue profiles are JSON files in ``profiles/`` (one per target, every number with its
public source). This package imports only pydantic and the standard library.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from pydantic import ValidationError

from service.engine.devices.host import host_profile
from service.engine.devices.profile import DeviceProfile
from service.engine.errors import EngineError

__all__ = [
    "DeviceProfile",
    "get_device",
    "host_profile",
    "list_devices",
    "parse_device",
]

HOST = "host"


@cache
def _catalogue() -> dict[str, DeviceProfile]:
    out: dict[str, DeviceProfile] = {}
    folder = resources.files(__package__).joinpath("profiles")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        profile = DeviceProfile.model_validate(json.loads(entry.read_text(encoding="utf-8")))
        if profile.name in out or profile.name == HOST:
            raise ValueError(f"duplicate device profile {profile.name!r}")
        out[profile.name] = profile
    return out


def list_devices() -> list[DeviceProfile]:
    """All catalogue profiles and ``host``, sorted by name."""
    return sorted([*_catalogue().values(), host_profile()], key=lambda p: p.name)


def get_device(name: str) -> DeviceProfile:
    """The profile called ``name`` (case-insensitive); ``"host"`` is this machine's CPU."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if key == HOST:
        return host_profile()
    try:
        return _catalogue()[key]
    except KeyError:
        raise EngineError(
            "unknown_device",
            f"unknown device {str(name)[:64]!r}; known devices: "
            + ", ".join(p.name for p in list_devices()),
            {"known": [p.name for p in list_devices()]},
        ) from None


def _validation_details(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "device", "message": e["msg"]}
        for e in exc.errors()
    ]


def parse_device(value: str | dict[str, Any]) -> DeviceProfile:
    """A job's ``device``: a profile name, or an inline custom profile (validated).

    A dict may name ``"extends": "<catalogue name>"`` and override some fields (for example a
    Raspberry Pi 5 with less memory); ``{"name": "<catalogue name>"}`` alone is that profile;
    otherwise it must give every required field.
    """
    if isinstance(value, DeviceProfile):
        return value
    if isinstance(value, str):
        return get_device(value)
    if not isinstance(value, dict):
        raise EngineError(
            "invalid_device",
            "device must be a profile name or an object describing a custom profile",
            {"errors": [{"field": "device", "message": "expected a string or an object"}]},
        )
    data = dict(value)
    if set(data) == {"name"} and isinstance(data["name"], str):
        return get_device(data["name"])  # {"name": "nvidia_t4"}: a catalogue reference
    base_name = data.pop("extends", None)
    if base_name is not None:
        if not isinstance(base_name, str):
            raise EngineError(
                "invalid_device",
                "'extends' must name a catalogue profile",
                {"errors": [{"field": "extends", "message": "expected a profile name"}]},
            )
        base = get_device(base_name).model_dump()
        # An override of a number invalidates the base profile's source for it.
        sources = {k: v for k, v in base["sources"].items() if k.split(".")[0] not in data}
        sources.update(data.get("sources", {}) or {})
        base.update(data)
        base["sources"] = sources
        base.setdefault("name", f"{base_name}_custom")
        data = base
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise EngineError(
            "invalid_device",
            "the custom device profile is invalid",
            {"errors": _validation_details(exc)},
        ) from None
