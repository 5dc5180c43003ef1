"""Request bodies of the API (pydantic). Responses are the records' own models.

Constraints are the engine's own model (``AutoConstraints``): one definition for both.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.engine.constraints import AutoConstraints
from service.engine.inputs import MAX_INPUTS, JobInputs
from service.errors import ValidationFailed

BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(model: type[BodyT]) -> BodyT:
    """The request's JSON object validated as ``model`` (422 naming the field otherwise)."""
    # Imported here: the client imports these schemas and needs no server modules.
    from service.api.context import services
    from service.api.json_body import read_json_body

    body = read_json_body(services().settings)
    if not isinstance(body, dict):
        raise ValidationFailed(
            "the body must be a JSON object",
            extra={"errors": [{"field": "body", "message": "JSON object expected"}]},
        )
    return model.model_validate(body)


class JobCreate(BaseModel):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=64)
    device: str | dict[str, Any] = Field(
        default="host", description="A device name from /v1/devices or an inline profile."
    )
    recipe: list[dict[str, Any]] | Literal["auto"] = Field(
        description='Ordered passes [{"pass": name, ...params}] or "auto".'
    )
    constraints: AutoConstraints = Field(default_factory=lambda: AutoConstraints.model_validate({}))
    dataset_id: str | None = Field(default=None, max_length=64)
    callback_url: str | None = Field(default=None, max_length=2048)
    inputs: JobInputs = Field(
        default_factory=dict, max_length=MAX_INPUTS,
        description='Shapes and values of model inputs by name, e.g. {"image": {"shape": '
        '[1, 3, 640, 640]}, "sr": {"value": 16000}}: what generated evaluation and calibration '
        "inputs use (without a dataset) instead of probing.")
