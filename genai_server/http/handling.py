"""What every generation handler does the same way: parse the body it was given, start the request's clock, and
write the serving layer's answer as JSON with timing headers or as SSE."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from genai_server.backends import Response, Result
from genai_server.errors import APIError, from_validation_error
from genai_server.http.app_keys import SETTINGS
from genai_server.http.request_state import (
    ARRIVAL,
    BODY,
    PARSED,
    REQUEST_ID,
    REQUEST_STATS,
    SLO_TICKET,
    STREAM_OUTCOME,
)
from genai_server.http.sse import CHAT_SSE, SseDialect, write_sse
from genai_server.protocol import SamplingRequest, json_bytes
from genai_server.telemetry.access_log import log_exchange
from genai_server.telemetry.clock import RequestTelemetry

RequestT = TypeVar("RequestT", bound=SamplingRequest)
T = TypeVar("T")


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


def start_clock(request: web.Request) -> RequestTelemetry:
    """This request's clock, started at its arrival (so time waiting for a slot is queue time), kept on the
    request for its record; its first token is told to the request's TTFT forecast (SLO admission)."""
    ticket = request.get(SLO_TICKET)
    stats = request[REQUEST_STATS] = RequestTelemetry(
        arrival=request.get(ARRIVAL, time.perf_counter()),
        on_first_token=ticket.first_token if ticket is not None else None,
    )
    return stats


async def respond(
    request: web.Request,
    stats: RequestTelemetry,
    body: SamplingRequest | None,
    result: Result,
    dialect: SseDialect = CHAT_SSE,
) -> web.StreamResponse:
    """Write the serving layer's answer: a whole response as JSON with timing headers, a stream as SSE written as
    ``dialect`` says. ``body``: the request as chat, for LOG_PROMPTS (None: relayed as it came, not logged)."""
    if request.app[SETTINGS].log_prompts and body is not None:
        log_exchange(request.get(REQUEST_ID), body, result if isinstance(result, BaseModel | dict) else None)
    if isinstance(result, BaseModel | dict):
        whole = json_response(result)
        whole.headers.update(timing_headers(stats))
        return whole
    settings = request.app[SETTINGS]
    stream, request[STREAM_OUTCOME] = await write_sse(
        request,
        result,
        write_timeout=settings.client_write_timeout,
        keep_alive_s=settings.stream_keepalive_interval,
        dialect=dialect,
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


def translated(build: Callable[[], T], params: Mapping[str, str]) -> T:
    """A translated API's request built as chat, its checks blaming the parameter the client sent (``params``: the
    chat name of each parameter that API names otherwise)."""
    try:
        return build()
    except ValidationError as exc:
        raise blamed(from_validation_error(exc), params) from None
    except APIError as exc:
        raise blamed(exc, params) from None


def blamed(exc: APIError, params: Mapping[str, str]) -> APIError:
    """``exc`` naming the client's parameter where chat's differs (``max_completion_tokens`` -> ``max_tokens``)."""
    if exc.param is not None:
        head, dot, rest = exc.param.partition(".")
        if head in params:
            exc.message = exc.message.replace(head, params[head], 1)
            exc.param = params[head] + dot + rest
    return exc
