"""HTTP handlers: parse the request, call the serving layer, write JSON or SSE. Nothing else."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from genai_server.backends import Response, Result
from genai_server.http.app_keys import ARRIVAL, BODY, REQUEST_STATS, SERVING, SETTINGS
from genai_server.http.request_log import log_exchange
from genai_server.http.sse import write_sse
from genai_server.protocol import ChatCompletionRequest, CompletionRequest, json_bytes
from genai_server.telemetry.clock import RequestTelemetry

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_body(request: web.Request, model: type[RequestT]) -> RequestT:
    """The JSON body (read and checked by ``request_body.py`` before the slot) validated as ``model``."""
    return model.model_validate(request[BODY])


def json_response(payload: Response) -> web.Response:
    """A pydantic model, or relayed upstream JSON, as a JSON response."""
    return web.Response(body=json_bytes(payload), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    return json_response(request.app[SERVING].list_models())


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model_id}``."""
    return json_response(request.app[SERVING].get_model(request.match_info["model_id"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    stats = _telemetry(request)
    body = parse_body(request, ChatCompletionRequest)
    return await _respond(request, stats, body, request.app[SERVING].chat(body, stats))


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    stats = _telemetry(request)
    body = parse_body(request, CompletionRequest)
    return await _respond(request, stats, body, request.app[SERVING].complete(body, stats))


def _telemetry(request: web.Request) -> RequestTelemetry:
    """This request's clock, started at its arrival (so time waiting for a slot is queue time), kept on the
    request for the log and the metrics."""
    stats = request[REQUEST_STATS] = RequestTelemetry(arrival=request.get(ARRIVAL, time.perf_counter()))
    return stats


async def _respond(
    request: web.Request, stats: RequestTelemetry, body: BaseModel, pending: Awaitable[Result]
) -> web.StreamResponse:
    """Write the serving layer's answer: a whole response as JSON with timing headers, a stream as SSE."""
    result = await pending
    if request.app[SETTINGS].log_prompts:
        log_exchange(request, body, result if isinstance(result, BaseModel | dict) else None)
    if isinstance(result, BaseModel | dict):
        response = json_response(result)
        response.headers.update(timing_headers(stats))
        return response

    def client_gone() -> None:
        stats.client_disconnected = True

    def failed(status: int) -> None:
        stats.error_status = status

    return await write_sse(
        request,
        result,
        on_client_gone=client_gone,
        on_error=failed,
        write_timeout=request.app[SETTINGS].client_write_timeout,
    )


def timing_headers(stats: RequestTelemetry) -> dict[str, str]:
    """TGI's timing headers (milliseconds), plus time to first token. Streams cannot carry them: headers
    leave before the first token; their last chunk carries the same figures."""
    figures = stats.metrics()
    values = {
        "x-queue-time": figures.queue_time_ms,
        "x-inference-time": figures.generation_time_ms,
        "x-time-per-token": figures.time_per_output_token_ms,
        "x-total-time": figures.e2e_latency_ms,
        "x-time-to-first-token": figures.time_to_first_token_ms,
        "x-prompt-tokens": figures.prompt_tokens,
        "x-cached-prompt-tokens": figures.cached_prompt_tokens,
        "x-generated-tokens": figures.completion_tokens,
    }
    return {name: str(value) for name, value in values.items() if value is not None}


def add_routes(app: web.Application) -> None:
    """Register every route."""
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
