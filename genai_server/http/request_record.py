"""The outermost middleware: a request id for every request, and one record of every finished request handed to its
sinks: the access log, Prometheus (generation requests) and the request's span (while tracing is on).

Outermost, so that it sees the status a client really got, after error mapping, and its ``X-Request-Id`` header is
added when any response is prepared, streams included. The record is built once, here, from what the middlewares
and the handler left on the request (``request_state.py``); the figures in it were computed once, when the serving
layer stopped the request's clock.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from genai_server import __version__
from genai_server.http.app_keys import TRACER
from genai_server.http.endpoints import endpoint_of
from genai_server.http.first_byte import FirstBytes
from genai_server.http.request_state import (
    ARRIVAL,
    BODY,
    ERROR,
    PARSED,
    REQUEST_ID,
    REQUEST_STATS,
    STREAM_OUTCOME,
)
from genai_server.logs import current_request_id
from genai_server.protocol import SamplingRequest
from genai_server.telemetry.access_log import log_request
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.genai import REQUEST_ATTRIBUTES
from genai_server.telemetry.prometheus import ServerMetrics
from genai_server.telemetry.record import CLIENT_CLOSED_REQUEST, Moments, RequestRecord
from genai_server.telemetry.tracing import finish_span, generation_span, tracer_provider

# What happened to a request besides its access line (a client that left).
events_log = logging.getLogger(__name__)

# A client's id is echoed back only if it is short and harmless in a header and a log line.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def setup_request_record(
    app: web.Application,
    metrics: ServerMetrics,
    *,
    default_backend: str,
    span_exporter: SpanExporter | None,
    first_bytes: FirstBytes | None = None,
) -> None:
    """Add the request-record middleware, the signal that sets ``X-Request-Id``, and the tracer when spans are
    exported (``span_exporter``; None: tracing off). ``metrics`` records generation requests; ``default_backend``
    is what a request no backend took is labelled with. ``first_bytes``: the server's sockets, which know when each
    request's first byte arrived, its clock's start (None, a test's server: when this middleware first sees it)."""
    if span_exporter is not None:
        app.cleanup_ctx.append(_tracer_context(span_exporter))

    @web.middleware
    async def request_record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[REQUEST_ID] = _request_id(request)
        request_id_token = current_request_id.set(request[REQUEST_ID])
        first_byte = first_bytes.arrival(request) if first_bytes is not None else None
        arrival = request[ARRIVAL] = first_byte if first_byte is not None else time.perf_counter()
        endpoint = endpoint_of(request)
        operation = endpoint.operation if endpoint is not None else None
        status = 500
        traced = generation_span(request.app.get(TRACER), operation, request.headers) if operation else nullcontext()
        with traced as span:
            try:
                response = await handler(request)
                status = response.status
                return response
            except asyncio.CancelledError:
                status = CLIENT_CLOSED_REQUEST
                _log_cancelled(request)
                raise
            finally:
                if first_bytes is not None:  # first: nothing below may leave the connection's stamp in place
                    first_bytes.request_ended(request)
                record = _record(request, operation, status, time.perf_counter() - arrival, default_backend)
                log_request(record)
                if record.generates:
                    metrics.observe(record)
                if span is not None:
                    finish_span(span, record)
                current_request_id.reset(request_id_token)

    app.middlewares.append(request_record)
    app.on_response_prepare.append(_add_request_id)


def _tracer_context(exporter: SpanExporter) -> Callable[[web.Application], AsyncIterator[None]]:
    async def tracer(app: web.Application) -> AsyncIterator[None]:
        provider = tracer_provider(exporter)
        app[TRACER] = provider.get_tracer("genai_server", __version__)
        yield
        provider.shutdown()  # flushes what is left

    return tracer


def _log_cancelled(request: web.Request) -> None:
    """aiohttp cancels the handler of a client that disconnected (handler_cancellation), and at shutdown."""
    gone = request.transport is None or request.transport.is_closing()
    events_log.info("client disconnected" if gone else "handler cancelled", extra={"fields": {"status": 499}})


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _SAFE_ID.match(given) else uuid.uuid4().hex


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


def _record(
    request: web.Request, operation: str | None, status: int, duration_s: float, default_backend: str
) -> RequestRecord:
    """The finished request as its sinks read it. Its status is the one it really ended with: 499 if the client
    went away mid-stream (its 200 headers were sent, the answer was not), an error event's if one ended its stream,
    else the response's."""
    outcome = request.get(STREAM_OUTCOME)
    error = outcome.error if outcome is not None and outcome.error is not None else request.get(ERROR)
    if outcome is not None and outcome.client_left:
        status = CLIENT_CLOSED_REQUEST
    elif outcome is not None and outcome.error is not None:
        status = outcome.error.status
    # A request refused before its handler started a clock has an empty one: nothing measured, nothing served.
    stats = request.get(REQUEST_STATS) or RequestTelemetry(arrival=request[ARRIVAL])
    parsed = request.get(PARSED)
    return RequestRecord(
        request_id=request[REQUEST_ID],
        method=request.method,
        path=request.path,
        status=status,
        duration_s=duration_s,
        operation=operation,
        model=stats.model,
        requested_model=parsed.model if parsed is not None else _body_model(request.get(BODY)),
        backend=stats.backend or default_backend,
        replica=stats.replica,
        error_code=error.code if error is not None else None,
        error_param=error.param if error is not None else None,
        moments=Moments(stats.arrival, stats.admitted, stats.first_token, stats.end),
        figures=stats.metrics() if stats.finished else None,
        itl_s=tuple(stats.itl_s) if stats.finished else (),
        request_attributes=_attributes(parsed),
    )


def _body_model(body: dict[str, Any] | None) -> str | None:
    """The model a body that was never parsed asks for (a request refused before its handler), if it names one."""
    model = (body or {}).get("model")
    return model if isinstance(model, str) else None


def _attributes(parsed: SamplingRequest | None) -> dict[str, int | float]:
    """The sampling parameters the client set, as numbers; max_tokens whichever name it was sent under."""
    if parsed is None:
        return {}
    attributes: dict[str, int | float] = {}
    for name in REQUEST_ATTRIBUTES:
        value = parsed.limit if name == "max_tokens" else getattr(parsed, name, None)
        given = name == "max_tokens" or name in parsed.model_fields_set
        if given and isinstance(value, int | float) and not isinstance(value, bool):
            attributes[name] = value
    return attributes
