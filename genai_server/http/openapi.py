"""``GET /openapi.json``: the server's own OpenAPI 3.1 description, generated from the endpoint table and the
protocol models.

It is what the fuzzing tests (schemathesis) drive the server with, and a map for client generators.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from genai_server import __version__
from genai_server.http.endpoints import Endpoint


class ErrorBody(BaseModel):
    """The error object of the envelope."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server returns."""

    error: ErrorBody


OPENAPI_DOCUMENT = web.AppKey("openapi_document", dict[str, Any])
# The errors a generation request can meet, from its body to its upstream.
_GENERATION_ERRORS = ("400", "401", "404", "408", "413", "415", "429", "502", "503", "504")
# An aiohttp path parameter with its pattern, e.g. "{model_id:.+}": OpenAPI writes it "{model_id}".
_PARAMETER = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: {"description": "error", **_json(_ref("ErrorResponse"))} for status in statuses}


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    """One endpoint as an OpenAPI operation."""
    response = _ref(endpoint.response_model.__name__) if endpoint.response_model else {"type": "object"}
    ok: dict[str, Any] = {"description": endpoint.summary, **_json(response)}
    operation: dict[str, Any] = {"responses": {"200": ok}}
    parameters = _PARAMETER.findall(endpoint.path)
    if parameters:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in parameters
        ]
    if endpoint.generates:
        assert endpoint.request_model is not None  # every generation endpoint declares its body
        operation["requestBody"] = {"required": True, **_json(_ref(endpoint.request_model.__name__))}
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        operation["responses"].update(_errors(*sorted(_GENERATION_ERRORS)))
        return operation
    if endpoint.unavailable:
        operation["responses"]["503"] = {"description": "draining", **_json({"type": "object"})}
    errors = ([] if endpoint.public else ["401"]) + (["404"] if parameters else [])
    operation["responses"].update(_errors(*errors))
    return operation


def openapi_document(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """The whole description of the documented endpoints."""
    documented = [endpoint for endpoint in endpoints if endpoint.documented]
    models = {model for e in documented for model in (e.request_model, e.response_model) if model is not None}
    _, defs = models_json_schema(
        [(model, "validation") for model in sorted(models | {ErrorResponse}, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in documented:
        paths.setdefault(_PARAMETER.sub(r"{\1}", endpoint.path), {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {"title": "genai_server", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }


def setup_openapi(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    """Build the description once, for ``GET /openapi.json``."""
    app[OPENAPI_DOCUMENT] = openapi_document(endpoints)


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.json_response(request.app[OPENAPI_DOCUMENT])
