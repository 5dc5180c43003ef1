"""The pass registry: one frozen pydantic config and one class per technique.

A pass declares ``name``, ``config_model`` (a frozen pydantic model with defaults and field
descriptions), what kind of technique it is (``quantizes``, ``calibrates``, ``trains``,
``scoped``: see ``Pass``) and ``run(model, config, ctx) -> model``. Registering a pass never
edits the pipeline: ``parse_recipe`` looks passes up here by name and the pipeline asks the class what it
does instead of matching names. Heavy libraries (onnxruntime, torch) are imported inside
``run`` so that the API can validate recipes without them.

``ctx`` (``PassContext``) stands where STYLE.md says ``workdir``: besides the working
directory a pass needs the calibration/training data, a progress hook and a cancel check.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from service.engine.errors import EngineError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

    from service.engine.devices.profile import DeviceProfile
    from service.engine.inputs import InputPlan
    from service.engine.int8_encoding import Int8Encoding


# A pass result counts as smaller when it is at most this fraction of the input's bytes.
SMALLER_RATIO = 0.98


class PassConfig(BaseModel):
    """Base for every pass config: frozen, unknown fields refused.

    A pass that can be restricted to part of the graph derives its config from
    ``service.engine.scope.ScopeConfig`` (one set of field names for every such pass).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Set by ``ScopeConfig``: the config restricts its pass to part of the graph, and the older
    # scope option names its recipes may still use (read here without importing the scope).
    is_scope: ClassVar[bool] = False
    legacy_names: ClassVar[frozenset[str]] = frozenset()

    def referenced_models(self) -> list[str]:
        """Ids of other uploaded models this step reads (``PassContext.resolve_model``): the
        worker fetches them before the engine starts, the engine has no store of its own."""
        return []


ConfigT = TypeVar("ConfigT", bound=PassConfig)


@dataclass
class PassContext:
    """What a pass may use besides the model and its config.

    - ``workdir``: a private scratch directory (exists, writable, removed by the caller).
    - ``dataset``: input arrays keyed by model input name (first axis = samples), or None.
    - ``labels``: optional integer labels aligned with the dataset's first axis.
    - ``original``: the model as ingested, before any pass (teacher for distillation).
    - ``progress(fraction, message)``: report progress inside the pass (0..1).
    - ``check_cancelled()``: raises if the job was cancelled; call it between steps.
    - ``resolve_model(model_id)``: a local path for another uploaded model (a student or an
      extra teacher named in a config), or None where the caller offers no such lookup.
    - ``notes``: the pass writes what it did here (JSON-able); it lands in report.json.
    - ``target``: the job's target device (None: the host itself); ``host``: the machine that
      measures the job (None: this one). Encodings that depend on the CPU's kernels (int8
      ``reduce_range``) are chosen from both with ``int8_encoding``.
    - ``inputs``: without a dataset, the resolved input plan (``service.engine.inputs``:
      shapes and values the original runs on); ``inputs.feeds(n, seed)`` generates samples.
    """

    workdir: Path
    dataset: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    original: onnx.ModelProto | None = None
    progress: Callable[[float, str], None] = lambda fraction, message: None
    check_cancelled: Callable[[], None] = lambda: None
    resolve_model: Callable[[str], Path] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    target: DeviceProfile | None = None
    host: DeviceProfile | None = None

    def int8_encoding(self, requested: bool | None, weight_type: str = "int8") -> Int8Encoding:
        """The int8 weight encoding for this job's target and host (see ``int8_encoding``)."""
        from service.engine.devices import host_profile
        from service.engine.int8_encoding import choose_int8_encoding

        return choose_int8_encoding(
            requested, weight_type=weight_type, target=self.target, host=self.host or host_profile()
        )

    inputs: InputPlan | None = None


class Pass(Generic[ConfigT]):
    """A compression technique. Subclasses set ``name``, ``config_model`` and ``run``, and say
    what kind of technique they are (every registered pass sets all four itself):

    - ``quantizes``: lowers the precision of weights or activations (int8, int4, fp16); a
      recipe made only of such passes is refused on an already quantized model.
    - ``calibrates``: sets activation ranges from sample inputs without training (the dataset,
      or generated inputs when there is none); the report says what it calibrated on. A pass
      whose use of sample inputs depends on its config says so in ``calibrates_with``.
    - ``trains``: runs torch training on the job's dataset (always, or when its config asks for
      recovery rounds).
    - ``scoped``: its config derives from ``service.engine.scope.ScopeConfig`` (op types, nodes
      to exclude...); ``register`` checks that the two agree.
    - ``streams``: it also runs on a model whose weights stay in external data files
      (``service.engine.external``): it reads them one tensor at a time and writes its own
      under ``ctx.workdir``, never the whole model in memory. Other passes are refused on such
      a model.
    """

    name: ClassVar[str]
    config_model: ClassVar[type[PassConfig]]
    description: ClassVar[str] = ""
    quantizes: ClassVar[bool] = False
    calibrates: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    scoped: ClassVar[bool] = False
    streams: ClassVar[bool] = False

    @classmethod
    def calibrates_with(cls, config: PassConfig) -> bool:
        """Whether a step with ``config`` calibrates on sample inputs (default: ``calibrates``;
        ``int4_weight_only`` does only for its data-driven methods)."""
        return cls.calibrates

    @classmethod
    def cannot_stream(cls, config: PassConfig) -> str | None:
        """Why a step with ``config`` cannot run on a model kept in external data, or None
        (default: ``streams`` says; ``int4_weight_only`` streams only some of its options)."""
        return None if cls.streams else f"pass {cls.name!r} needs the whole model in memory"

    def run(self, model: onnx.ModelProto, config: ConfigT, ctx: PassContext) -> onnx.ModelProto:
        raise NotImplementedError


_REGISTRY: dict[str, type[Pass[Any]]] = {}


def register(cls: type[Pass[Any]]) -> type[Pass[Any]]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    if cls.scoped != cls.config_model.is_scope:
        raise ValueError(
            f"pass {cls.name!r}: scoped={cls.scoped} but its config "
            f"{'does not derive' if cls.scoped else 'derives'} from ScopeConfig"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import service.engine.passes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def registered_passes() -> dict[str, type[Pass[Any]]]:
    """All passes, by name (imports every module of ``service.engine.passes`` once)."""
    _load_all()
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass[Any]]:
    """The pass class registered as ``name``; ``EngineError('unknown_pass')`` otherwise."""
    passes = registered_passes()
    try:
        return passes[name]
    except KeyError:
        raise EngineError(
            "unknown_pass",
            f"unknown pass {name!r}; known passes: {', '.join(sorted(passes))}",
        ) from None


def config_keys(cls: type[Pass[Any]]) -> set[str]:
    """The option names a recipe step of ``cls`` may use: its config's fields, plus the older
    scope names it still accepts (``ScopeConfig.legacy_names``)."""
    return set(cls.config_model.model_fields) | cls.config_model.legacy_names


def parse_step(step: dict[str, Any]) -> tuple[type[Pass[Any]], PassConfig]:
    """Turn one recipe step ``{"pass": name, **params}`` into (pass class, validated config)."""
    if not isinstance(step, dict) or not isinstance(step.get("pass"), str):
        raise EngineError("invalid_recipe", 'each recipe step must be an object with a "pass" name')
    params = {k: v for k, v in step.items() if k != "pass"}
    cls = get_pass(step["pass"])
    try:
        config = cls.config_model.model_validate(params)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise EngineError(
            "invalid_recipe",
            f"invalid parameters for pass {step['pass']!r}",
            {"pass": step["pass"], "errors": errors},
        ) from None
    return cls, config


def referenced_models(recipe: list[dict[str, Any]] | str) -> list[str]:
    """Every other uploaded model a recipe reads, in order, once each (none for ``"auto"``)."""
    if not isinstance(recipe, list):
        return []
    ids = [mid for _, config in parse_recipe(recipe) for mid in config.referenced_models()]
    return list(dict.fromkeys(ids))


def parse_recipe(recipe: list[dict[str, Any]]) -> list[tuple[type[Pass[Any]], PassConfig]]:
    """Validate a whole recipe; raises ``EngineError('invalid_recipe')`` naming the bad step."""
    if not isinstance(recipe, list) or not recipe:
        raise EngineError("invalid_recipe", "a recipe is a non-empty list of steps")
    out = []
    for index, step in enumerate(recipe):
        try:
            out.append(parse_step(step))
        except EngineError as exc:
            exc.details.setdefault("step", index)
            raise
    return out
