"""``parse_body``: the request's JSON body validated against one of the request schemas
(``service.schemas``, or a view's own pydantic model); the Flask side of those schemas."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from service.api.context import services
from service.api.json_body import read_json_body
from service.errors import ValidationFailed

BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(model: type[BodyT]) -> BodyT:
    """The request's JSON object validated as ``model`` (422 naming the field otherwise)."""
    body = read_json_body(services().settings)
    if not isinstance(body, dict):
        raise ValidationFailed(
            "the body must be a JSON object",
            extra={"errors": [{"field": "body", "message": "JSON object expected"}]},
        )
    return model.model_validate(body)
