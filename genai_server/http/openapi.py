"""``GET /openapi.json``: the server's own OpenAPI 3.1 description, generated from the protocol models.

It is what the fuzzing tests (schemathesis) drive the server with, and a map for client generators.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from genai_server import __version__
from genai_server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)


class ErrorBody(BaseModel):
    """The error object of the envelope."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server returns."""

    error: ErrorBody


_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    CompletionRequest,
    ChatCompletion,
    Completion,
    ModelCard,
    ModelList,
    ErrorResponse,
]
_ERRORS = {"400", "401", "404", "408", "413", "415", "429", "502", "503", "504"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: {"description": "error", **_json(_ref("ErrorResponse"))} for status in statuses}


def _generation(request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "requestBody": {"required": True, **_json(_ref(request))},
            "responses": {
                "200": {
                    "description": "the completion (JSON), or with stream=true an SSE stream",
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(*sorted(_ERRORS)),
            },
        }
    }


def _get(description: str, schema: dict[str, Any] | None = None, *errors: str) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": description}
    if schema is not None:
        ok.update(_json(schema))
    return {"get": {"responses": {"200": ok, **_errors(*errors)}}}


def openapi_document() -> dict[str, Any]:
    """The whole description."""
    _, defs = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template="#/components/schemas/{model}"
    )
    model_path = _get("one model", _ref("ModelCard"), "401", "404")
    model_path["get"]["parameters"] = [
        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "genai_server", "version": __version__},
        "paths": {
            "/v1/chat/completions": _generation("ChatCompletionRequest", "ChatCompletion"),
            "/v1/completions": _generation("CompletionRequest", "Completion"),
            "/v1/models": _get("every model", _ref("ModelList"), "401"),
            "/v1/models/{model_id}": model_path,
            "/health": _get("the model is loaded", {"type": "object"}),
            "/health/live": _get("the process answers", {"type": "object"}),
            "/health/ready": {
                "get": {
                    "responses": {
                        "200": {"description": "serving", **_json({"type": "object"})},
                        "503": {"description": "draining", **_json({"type": "object"})},
                    }
                }
            },
        },
        "components": {"schemas": defs.get("$defs", {})},
    }


def setup_openapi(app: web.Application) -> None:
    """Serve the description at ``GET /openapi.json`` (built once)."""
    document = openapi_document()

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", serve)
