"""HTTP handlers: parse the request, call the serving layer, write JSON or SSE. Nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from genai_server.app_keys import REQUEST_STATS, SERVING
from genai_server.errors import InvalidRequest, UnsupportedMediaType
from genai_server.protocol import ChatCompletionRequest, CompletionRequest
from genai_server.serving import RequestStats
from genai_server.sse import write_sse

RequestT = TypeVar("RequestT", bound=BaseModel)


async def parse_body(request: web.Request, model: type[RequestT]) -> RequestT:
    """The JSON body validated as ``model``; not-JSON is a 415, malformed JSON a 400."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not '{request.content_type}'")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object", code="invalid_json")
    return model.model_validate(body)


def json_response(payload: BaseModel) -> web.Response:
    """A pydantic model as a JSON response."""
    return web.Response(text=payload.model_dump_json(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """``GET /health``: the model is loaded (the port only opens after it is)."""
    return web.json_response({"status": "ok", "model": request.app[SERVING].model_id})


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    return json_response(request.app[SERVING].list_models())


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model_id}``."""
    return json_response(request.app[SERVING].get_model(request.match_info["model_id"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    body = await parse_body(request, ChatCompletionRequest)
    return await _respond(request, request.app[SERVING].chat(body, _stats(request)))


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    body = await parse_body(request, CompletionRequest)
    return await _respond(request, request.app[SERVING].complete(body, _stats(request)))


def _stats(request: web.Request) -> RequestStats:
    """Fresh stats for this request, kept on it for the access log."""
    stats = request[REQUEST_STATS] = RequestStats()
    return stats


async def _respond(request: web.Request,
                   pending: Awaitable[BaseModel | AsyncGenerator[BaseModel, None]]) -> web.StreamResponse:
    """Write the serving layer's answer: a whole response as JSON, a chunk stream as SSE."""
    result = await pending
    if isinstance(result, BaseModel):
        return json_response(result)
    return await write_sse(request, result)


def add_routes(app: web.Application) -> None:
    """Register every route."""
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
