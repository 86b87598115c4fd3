"""The endpoint table and the API's thin handlers: parse the request, call the serving layer, write JSON or SSE.

Every route the server answers is declared once, in ``endpoint_table``; the middlewares, the API-key check and the
OpenAPI document read it from there.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from genai_server.backends import Response, Result
from genai_server.http.app_keys import METRICS, SERVING, SETTINGS
from genai_server.http.endpoints import Endpoint
from genai_server.http.lifecycle import health, live, ready
from genai_server.http.openapi import openapi
from genai_server.http.request_state import (
    ARRIVAL,
    BODY,
    KEY_OWNER,
    PARSED,
    REQUEST_ID,
    REQUEST_STATS,
    STREAM_OUTCOME,
)
from genai_server.http.sse import write_sse
from genai_server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    json_bytes,
)
from genai_server.telemetry.access_log import log_exchange
from genai_server.telemetry.clock import RequestTelemetry

RequestT = TypeVar("RequestT", bound=SamplingRequest)


def parse_body(request: web.Request, model: type[RequestT]) -> RequestT:
    """The JSON body (read and checked by ``request_body.py`` before the slot) validated as ``model``; kept on the
    request for its record."""
    parsed = model.model_validate(request[BODY])
    sampling: SamplingRequest = parsed  # the record reads only what every request has
    request[PARSED] = sampling
    return parsed


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
    owner = request.get(KEY_OWNER, "")  # whose KV caches it may continue
    return await _respond(request, stats, body, request.app[SERVING].chat(body, stats, owner))


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    stats = _telemetry(request)
    body = parse_body(request, CompletionRequest)
    owner = request.get(KEY_OWNER, "")
    return await _respond(request, stats, body, request.app[SERVING].complete(body, stats, owner))


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, gauges read now."""
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _telemetry(request: web.Request) -> RequestTelemetry:
    """This request's clock, started at its arrival (so time waiting for a slot is queue time), kept on the
    request for its record."""
    stats = request[REQUEST_STATS] = RequestTelemetry(arrival=request.get(ARRIVAL, time.perf_counter()))
    return stats


async def _respond(
    request: web.Request, stats: RequestTelemetry, body: SamplingRequest, pending: Awaitable[Result]
) -> web.StreamResponse:
    """Write the serving layer's answer: a whole response as JSON with timing headers, a stream as SSE."""
    result = await pending
    if request.app[SETTINGS].log_prompts:
        log_exchange(request.get(REQUEST_ID), body, result if isinstance(result, BaseModel | dict) else None)
    if isinstance(result, BaseModel | dict):
        whole = json_response(result)
        whole.headers.update(timing_headers(stats))
        return whole
    settings = request.app[SETTINGS]
    stream, request[STREAM_OUTCOME] = await write_sse(
        request, result, write_timeout=settings.client_write_timeout, keep_alive_s=settings.stream_keepalive_interval
    )
    return stream


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


def endpoint_table(*, metrics_public: bool) -> tuple[Endpoint, ...]:
    """Every route of the server, once. ``metrics_public``: whether /metrics is answered without an API key."""
    return (
        Endpoint(
            "POST",
            "/v1/chat/completions",
            chat_completions,
            "the completion (JSON), or with stream=true an SSE stream",
            operation="chat",
            request_model=ChatCompletionRequest,
            response_model=ChatCompletion,
        ),
        Endpoint(
            "POST",
            "/v1/completions",
            completions,
            "the completion (JSON), or with stream=true an SSE stream",
            operation="text_completion",
            request_model=CompletionRequest,
            response_model=Completion,
        ),
        Endpoint("GET", "/v1/models", list_models, "every model", response_model=ModelList),
        Endpoint("GET", "/v1/models/{model_id:.+}", get_model, "one model", response_model=ModelCard),
        Endpoint("GET", "/health", health, "the model is loaded", public=True),
        Endpoint("GET", "/health/live", live, "the process answers", public=True),
        Endpoint("GET", "/health/ready", ready, "serving", public=True, unavailable=True),
        Endpoint("GET", "/openapi.json", openapi, "this description", public=True, documented=False),
        Endpoint("GET", "/metrics", metrics, "Prometheus metrics", public=metrics_public, documented=False),
    )
