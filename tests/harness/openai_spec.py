"""The official OpenAI API description, and a validator of payloads against its schemas."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

# Kept in the repository (MIT, licence beside it) so the suite needs nothing outside the checkout.
SPEC = Path(__file__).resolve().parents[1] / "openai-spec" / "openai-schemas-subset.json"
# The Responses API's schemas, from a newer description (JSON Schema already: no ``nullable``).
RESPONSES_SPEC = SPEC.with_name("openai-responses-subset.json")


def schema_validator(spec: Path = SPEC) -> Callable[[str, Any], None]:
    """Validate a payload against a schema of the official OpenAI API description (by the schema's name)."""
    document = _nullable_to_json_schema(json.loads(spec.read_text()))

    def validate(name: str, payload: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(payload)

    return validate


def _nullable_to_json_schema(node: Any) -> Any:
    """The spec is OpenAPI 3.0: ``nullable: true`` means "or null", which JSON Schema spells differently."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node
