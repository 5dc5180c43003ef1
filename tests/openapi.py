"""Checks responses against api_spec/openapi.yaml (the contract) with jsonschema."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent.parent / "api_spec" / "openapi.yaml"
SPEC_URI = "urn:edgepress:openapi"


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return dict(yaml.safe_load(SPEC_PATH.read_text()))


@lru_cache(maxsize=1)
def _registry() -> Registry:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource)


def flask_rule_to_template(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def match_path(path: str) -> str | None:
    """The spec's path template matching a concrete path."""
    for template in spec()["paths"]:
        pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec()
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _rebase(node: Any) -> Any:
    """Point local refs (#/components/...) into the registered spec document."""
    if isinstance(node, dict):
        return {
            k: (SPEC_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


def validate_response(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """Raise AssertionError unless (status, content type, body) is what the spec promises."""
    template = match_path(path.split("?")[0])
    assert template is not None, f"{path} is not in the spec"
    operation = spec()["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not in the spec"
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {template} -> {status} is not in the spec"
    content = _resolve(responses[str(status)]).get("content")
    if not content:
        return
    media = (content_type or "").split(";")[0].strip()
    assert media in content, f"{method} {template} -> {status}: {media} not in {list(content)}"
    schema = content[media].get("schema")
    if schema is None or body is None or not media.endswith("json"):
        return
    validator = jsonschema.Draft202012Validator(
        _rebase(schema), registry=_registry(), format_checker=jsonschema.FormatChecker()
    )
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {template} -> {status}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    )
