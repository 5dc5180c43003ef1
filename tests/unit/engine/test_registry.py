"""The pass registry: every registered pass says what it is, and every config (all of them,
found in the registry) survives JSON with its defaults and with a non-default value in every
field."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from service.engine.registry import (
    Pass,
    PassConfig,
    config_keys,
    get_pass,
    parse_step,
    register,
    registered_passes,
)
from service.engine.scope import LEGACY_NAMES, ScopeConfig

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
    assert cls.scoped == issubclass(cls.config_model, ScopeConfig)
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


def test_register_refuses_a_pass_whose_scoped_flag_contradicts_its_config() -> None:
    class Plain(PassConfig):
        pass

    class Liar(Pass[Plain]):
        name = "liar_for_the_test"
        config_model = Plain
        scoped = True

    with pytest.raises(ValueError, match="ScopeConfig"):
        register(Liar)
    assert "liar_for_the_test" not in registered_passes()


# --------------------------------------------------------------------------- JSON round trip


def _candidates(tp: Any, default: Any) -> list[Any]:
    """JSON-able values of type ``tp`` to try in place of ``default`` (validation picks)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [c for a in args if a is not type(None) for c in _candidates(a, default)]
    if origin is Literal:
        return list(args)
    if origin is list:
        inner = _candidates(args[0], None)
        subsets = [inner[:1], inner[:2], inner[1:2], inner[:3]]
        return [[0.3, 0.6], *subsets] if args[0] is float else subsets
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [_non_default(tp, default)]
    if tp is bool:
        return [True, False]
    if tp is int:
        d = default if isinstance(default, int) else 1
        return [d * 2, d + 1, d - 1, d // 2, 1, 2, 16]
    if tp is float:
        d = default if isinstance(default, float) else 0.5
        return [d / 2, d * 0.99, d + 0.5, d * 2, 0.5, 95.0]
    if tp is str:
        return ["node_a"]
    raise AssertionError(f"no test values for {tp!r}: extend _candidates")


def _non_default(model: type[BaseModel], base: Any = None) -> dict[str, Any]:
    """A value for every field of ``model`` that differs from its default and validates."""
    current = (
        base.model_dump(mode="json") if isinstance(base, BaseModel) else dict(base or {})
    )
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        default_json = (
            default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        )
        for value in _candidates(field.annotation, default):
            if value == default_json:
                continue
            try:
                model.model_validate({**_required(model), **current, name: value})
            except ValidationError:
                continue
            current[name] = value
            break
        else:
            raise AssertionError(f"{model.__name__}.{name}: no valid non-default value found")
    return {**_required(model), **current}


def _required(model: type[BaseModel]) -> dict[str, Any]:
    return {
        name: _candidates(field.annotation, None)[0]
        for name, field in model.model_fields.items()
        if field.is_required()
    }


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trips_through_json_with_defaults(name: str) -> None:
    model = get_pass(name).config_model
    config = model()
    again = model.model_validate_json(config.model_dump_json())
    assert again == config
    assert again.model_dump() == config.model_dump()
    for field_name, field in model.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trips_through_json_with_every_field_changed(name: str) -> None:
    model = get_pass(name).config_model
    values = _non_default(model)
    config = model.model_validate(values)
    defaults = model().model_dump(mode="json")
    dumped = config.model_dump(mode="json")
    for field_name in model.model_fields:
        assert dumped[field_name] != defaults[field_name], f"{name}.{field_name} kept its default"
    assert model.model_validate_json(config.model_dump_json()) == config
    # And as a recipe step, the way the API receives it.
    cls, parsed = parse_step({"pass": name, **dumped})
    assert cls is get_pass(name) and parsed == config


@pytest.mark.parametrize("name", PASSES)
def test_unknown_options_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        get_pass(name).config_model.model_validate({"no_such_option": 1})


def test_config_keys_are_the_fields_and_the_older_scope_names() -> None:
    passes = _builtin_passes()
    assert config_keys(passes["graph_optimize"]) == {"level"}
    assert {"skip", "skip_first", "skip_first_last", "nodes_to_exclude"} <= config_keys(
        passes["prune_magnitude"]
    )
    assert "op_block_list" in config_keys(passes["fp16"])
    assert "skip" not in config_keys(passes["quantize_dynamic"])
    for cls in passes.values():
        extra = config_keys(cls) - set(cls.config_model.model_fields)
        assert extra <= set(LEGACY_NAMES)


def test_a_test_pass_without_kinds_gets_the_defaults() -> None:
    class Config(PassConfig):
        x: int = Field(1, description="x")

    class Bare(Pass[Config]):
        name = "bare"
        config_model = Config

    assert (Bare.quantizes, Bare.calibrates, Bare.trains, Bare.scoped) == (False,) * 4
    assert all(k not in vars(Bare) for k in KINDS)
