"""The pass registry: every registered pass says what it is."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from service.engine.registry import Pass, PassConfig, get_pass, registered_passes

KINDS = ("quantizes", "calibrates", "trains", "scoped")


def _builtin_passes() -> dict[str, type[Pass[Any]]]:
    """The passes of ``service.engine.passes`` (tests may register passes of their own)."""
    return {
        name: cls
        for name, cls in registered_passes().items()
        if cls.__module__.startswith("service.engine.passes.")
    }


PASSES = sorted(_builtin_passes())


def test_the_registry_finds_every_pass_module() -> None:
    import pkgutil

    import service.engine.passes as pkg

    modules = {info.name for info in pkgutil.iter_modules(pkg.__path__)}
    found = {cls.__module__.rsplit(".", 1)[1] for cls in _builtin_passes().values()}
    assert found == modules
    assert len(PASSES) >= 11


@pytest.mark.parametrize("name", PASSES)
def test_every_pass_sets_what_it_is_itself(name: str) -> None:
    cls = get_pass(name)
    for kind in KINDS:
        assert kind in vars(cls), f"{name} inherits {kind} instead of setting it"
        assert isinstance(vars(cls)[kind], bool)
    assert cls.description


def test_what_the_passes_are() -> None:
    passes = _builtin_passes()

    def having(kind: str) -> set[str]:
        return {n for n, c in passes.items() if getattr(c, kind)}

    assert having("quantizes") == {
        "quantize_dynamic", "quantize_static", "quantize_weight_only", "int4_weight_only",
        "fp16", "quantize_aware_training",
    }
    assert having("calibrates") == {"quantize_static"}
    assert having("trains") == {
        "distill", "quantize_aware_training", "prune_magnitude", "prune_2_4", "prune_channels",
    }
    assert having("scoped") == set(passes) - {"distill", "graph_optimize"}


def test_a_test_pass_without_kinds_gets_the_defaults() -> None:
    class Config(PassConfig):
        x: int = Field(1, description="x")

    class Bare(Pass[Config]):
        name = "bare"
        config_model = Config

    assert (Bare.quantizes, Bare.calibrates, Bare.trains, Bare.scoped) == (False,) * 4
    assert all(k not in vars(Bare) for k in KINDS)
