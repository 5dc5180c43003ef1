"""Which part of the graph a pass touches: one set of field names, one selection.

A pass whose config restricts it to part of the graph derives the config from ``ScopeConfig``
and declares the scope fields it honours, under these names:

- ``op_types``: the op types the pass works on (each pass has its own list and default);
- ``op_types_to_exclude``: op types left untouched (fp16: kept float32);
- ``nodes_to_exclude``: node names left untouched (sensitive layers); the weight-layer passes
  (``LayerScopeConfig``) also match the layer's weight initializer name;
- ``exclude_first`` / ``exclude_last``: leave the first / last weight layer of the selected
  op types untouched (``LayerScopeConfig``).

Recipes written with the older names keep working, with the same meaning:

- ``skip`` -> ``nodes_to_exclude``;
- ``op_block_list`` -> ``op_types_to_exclude``;
- ``skip_first`` -> ``exclude_first``;
- ``skip_first_last`` -> ``exclude_first`` and ``exclude_last``.

``scope_of(config)`` is the resolved ``Scope``; ``select_layers`` picks the weight layers a layer
pass touches (or refuses with ``no_effect``); ``exclude_nodes`` and ``weighted_layers`` are what
a search needs to keep chosen layers of a recipe in float (mixed precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
from pydantic import Field, model_validator

from service.engine.errors import EngineError
from service.engine.registry import PassConfig
from service.engine.training.graph import initializers, weight_layers
from service.engine.training.settings import LAYER_OPS, LayerOp

if TYPE_CHECKING:  # pragma: no cover
    from service.engine.registry import Pass

# Older field name -> the canonical field(s) it stands for.
LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    "skip": ("nodes_to_exclude",),
    "op_block_list": ("op_types_to_exclude",),
    "skip_first": ("exclude_first",),
    "skip_first_last": ("exclude_first", "exclude_last"),
}

EXCLUDED = "excluded by nodes_to_exclude"  # the skip reason every pass gives for a named node


@dataclass(frozen=True)
class Scope:
    """A config's scope, resolved: what is not set restricts nothing."""

    op_types: tuple[str, ...] | None = None  # None: the pass's own set
    op_types_to_exclude: tuple[str, ...] | None = None  # None: the pass's own default
    nodes_to_exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_last: bool = False

    def excludes(self, node: str, weight: str | None = None) -> bool:
        """True when ``node`` (or its weight initializer ``weight``) is named to be left alone."""
        return node in self.nodes_to_exclude or (
            weight is not None and weight in self.nodes_to_exclude
        )

    def takes(self, op_type: str) -> bool:
        """True when the scope's op types admit ``op_type``."""
        return (self.op_types is None or op_type in self.op_types) and (
            self.op_types_to_exclude is None or op_type not in self.op_types_to_exclude
        )


class ScopeConfig(PassConfig):
    """Base of the config of every pass that can be restricted to part of the graph.

    Declares no field itself: a pass declares the scope fields it honours (names above), and
    in ``legacy_names`` the older names its recipes used.
    """

    is_scope: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        """Map the older field names onto the canonical ones (both at once is refused)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for old, new in LEGACY_NAMES.items():
            if old not in out or old not in cls.legacy_names:
                continue  # not an older name of this config: validation refuses it as unknown
            given = [n for n in new if n in out]
            if given:
                raise ValueError(
                    f"{old!r} is the older name of {' and '.join(new)}: give one or the other, "
                    f"not both ({', '.join(given)} given too)"
                )
            value = out.pop(old)
            out.update(dict.fromkeys(new, value))
        return out

    # Read access under the older names, for code written against them.
    @property
    def skip(self) -> list[str]:
        return self._canonical("skip")  # type: ignore[no-any-return]

    @property
    def op_block_list(self) -> list[str] | None:
        return self._canonical("op_block_list")  # type: ignore[no-any-return]

    @property
    def skip_first(self) -> bool:
        return self._canonical("skip_first")  # type: ignore[no-any-return]

    @property
    def skip_first_last(self) -> bool:
        return self._canonical("skip_first_last")  # type: ignore[no-any-return]

    def _canonical(self, old: str) -> Any:
        new = LEGACY_NAMES[old]
        if old not in self.legacy_names:
            raise AttributeError(f"{type(self).__name__} has no field {old!r}")
        values = [getattr(self, n) for n in new]
        return values[0] if len(values) == 1 else all(values)


def scope_of(config: ScopeConfig) -> Scope:
    """The scope ``config`` sets (the scope fields it does not have restrict nothing)."""

    def names(field: str) -> tuple[str, ...] | None:
        value = getattr(config, field, None)
        return None if value is None else tuple(value)

    return Scope(
        op_types=names("op_types"),
        op_types_to_exclude=names("op_types_to_exclude"),
        nodes_to_exclude=names("nodes_to_exclude") or (),
        exclude_first=bool(getattr(config, "exclude_first", False)),
        exclude_last=bool(getattr(config, "exclude_last", False)),
    )


def nodes_to_exclude_field(
    description: str = "Node names to keep in float (sensitive layers).",
) -> Any:
    """The ``nodes_to_exclude`` field: an empty list by default."""
    return Field(default_factory=list, description=description)


class LayerScopeConfig(ScopeConfig):
    """The scope of the passes that rewrite Conv/Gemm/MatMul weights one layer at a time.

    Defaults suit pruning (first and last layers kept, tiny tensors kept); a pass changes a
    default by declaring the field again.
    """

    legacy_names: ClassVar[frozenset[str]] = frozenset({"skip", "skip_first", "skip_first_last"})

    op_types: list[LayerOp] = Field(
        default_factory=lambda: list(LAYER_OPS), description="layer types the pass rewrites"
    )
    nodes_to_exclude: list[str] = nodes_to_exclude_field(
        "node or weight names left untouched (sensitive layers)"
    )
    exclude_first: bool = Field(True, description="leave the first layer untouched")
    exclude_last: bool = Field(True, description="leave the last layer untouched")
    min_elements: int = Field(64, ge=1, description="weights smaller than this stay untouched")


# --------------------------------------------------------------------------- selection


def select_layers(
    model: onnx.ModelProto,
    config: LayerScopeConfig,
    *,
    none_left: str | Callable[[dict[str, str]], str] | None = None,
) -> tuple[list[tuple[onnx.NodeProto, str]], dict[str, str]]:
    """The weight layers ``config`` lets a pass rewrite, and the skipped ones with the reason.

    Layers are the Conv/Gemm/MatMul nodes of the selected op types with a float weight
    initializer, in graph order; the first and last of them are the ones ``exclude_first`` and
    ``exclude_last`` keep (when there are two or more). With ``none_left`` (a message, or a
    function of the skipped layers giving one) an empty selection raises ``no_effect``.
    """
    scope = scope_of(config)
    inits = initializers(model)
    layers = [(n, w) for n, w in weight_layers(model) if scope.takes(n.op_type)]
    skipped: dict[str, str] = {}
    chosen = []
    for i, (node, weight) in enumerate(layers):
        if scope.excludes(node.name, weight):
            skipped[weight] = EXCLUDED
        elif len(layers) > 1 and (
            (scope.exclude_first and i == 0) or (scope.exclude_last and i == len(layers) - 1)
        ):
            skipped[weight] = "first layer" if i == 0 else "last layer"
        elif int(np.prod(inits[weight].dims)) < config.min_elements:
            skipped[weight] = f"fewer than {config.min_elements} weights"
        else:
            chosen.append((node, weight))
    if none_left is not None:
        require(chosen, skipped, none_left)
    return chosen, skipped


def require(found: list[Any], skipped: Any, message: str | Callable[[Any], str]) -> list[Any]:
    """``found`` when it is not empty; else ``no_effect`` with ``message`` (or
    ``message(skipped)``) and the skipped items in the details."""
    if not found:
        text = message(skipped) if callable(message) else message
        raise EngineError("no_effect", text, {"skipped": skipped})
    return found


# --------------------------------------------------------------------------- for a search


def can_exclude_nodes(cls: type[Pass[Any]]) -> bool:
    """True when pass ``cls`` can leave named nodes untouched (``nodes_to_exclude``)."""
    return cls.scoped and "nodes_to_exclude" in cls.config_model.model_fields


def exclude_nodes(step: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """A copy of recipe ``step`` that also leaves the nodes ``names`` untouched.

    The step's own exclusions (under either name) are kept, ``names`` added after them; the
    result uses the canonical ``nodes_to_exclude``. Only for a pass that ``can_exclude_nodes``.
    """
    out = dict(step)
    kept = [*(out.pop("nodes_to_exclude", None) or []), *(out.pop("skip", None) or [])]
    out["nodes_to_exclude"] = list(dict.fromkeys([*kept, *names]))
    return out


def weighted_layers(model: onnx.ModelProto, op_types: Iterable[str]) -> list[tuple[str, str, int]]:
    """(node name, op type, weight elements) for named main-graph nodes of ``op_types`` that
    read initializers, the largest first: the layers a search may keep in float by name."""
    ops = set(op_types)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ops and node.name:
            weight = sum(math.prod(inits[i].dims) for i in node.input if i in inits)
            if weight:
                out.append((node.name, node.op_type, int(weight)))
    return sorted(out, key=lambda t: -t[2])
