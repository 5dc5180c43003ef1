"""Request bodies of the API: pydantic only, shared by the API and the client (which imports
neither Flask nor boto3). Responses are the records' own models (``service.jobs.record``, the
upload records). The API validates a body against these with ``service.api.schemas.parse_body``.

Constraints are the engine's own model (``AutoConstraints``): one definition for both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.constraints import AutoConstraints
from service.engine.inputs import MAX_INPUTS, JobInputs


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
