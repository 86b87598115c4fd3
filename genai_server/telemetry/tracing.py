"""Traces: one OpenTelemetry span per generation request, exported over OTLP, and ``traceparent`` passed upstream.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the SDK reads the other standard variables itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``, ...). The span follows the GenAI
semantic conventions: named ``{gen_ai.operation.name} {gen_ai.request.model}``, kind SERVER, a child of the
client's ``traceparent`` if it sent one, with the request and usage attributes and three events on this server's
clock: ``gen_ai.queue.end`` (generation starts), ``gen_ai.first_token`` and ``gen_ai.end``. Spans are exported by
the SDK's batch processor on a thread of its own, never on the event loop.

A relayed request carries the trace to the upstream (vLLM reads ``traceparent``): the span's own context when
tracing is on, otherwise the client's headers as they came, so an upstream's spans still join the client's trace.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from genai_server import __version__
from genai_server.http.app_keys import ARRIVAL, BODY, FINAL_STATUS, REQUEST_STATS
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.prometheus import NO_MODEL, OPERATIONS, PROVIDERS
from genai_server.telemetry.trace_context import upstream_trace_headers

TRACER = web.AppKey("tracer", trace.Tracer)
# What a client's trace headers must look like to be passed upstream untraced (W3C Trace Context: a version-00
# traceparent, a tracestate of at most 512 printable ASCII characters). Anything else is dropped, as the spec has a
# receiver drop what it cannot parse: a client's arbitrary bytes are not forwarded to an engine as trace context.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
# Request fields recorded as gen_ai.request.* attributes.
_REQUEST_ATTRIBUTES = {
    "max_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}


def setup_tracing(app: web.Application, endpoint: str | None, exporter: SpanExporter | None = None) -> None:
    """Trace generation requests when an OTLP endpoint is set (or an exporter is given, as the tests do); pass trace
    headers upstream either way."""
    if exporter is None and endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The spec's rule for the generic endpoint: traces go to its /v1/traces. The exporter reads the other
        # OTEL_EXPORTER_OTLP_* variables (headers, timeout, certificate) itself.
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    if exporter is not None:
        app.cleanup_ctx.append(_provider(exporter))
    app.middlewares.append(_tracing)


def _provider(exporter: SpanExporter) -> Callable[[web.Application], AsyncIterator[None]]:
    async def provider(app: web.Application) -> AsyncIterator[None]:
        # A provider of the app's own, not the global one: two apps in one process (the tests) never share spans.
        tracer_provider = TracerProvider(resource=_resource())
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        app[TRACER] = tracer_provider.get_tracer("genai_server", __version__)
        yield
        tracer_provider.shutdown()  # flushes what is left

    return provider


def _resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES as the SDK reads them; "genai-server" where they name no service
    (the SDK would say "unknown_service")."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "genai-server"}))
    return resource


@web.middleware
async def _tracing(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    operation = OPERATIONS.get(request.path)
    tracer = request.app.get(TRACER)
    if operation is None or request.method != "POST":
        return await handler(request)
    if tracer is None:
        upstream_trace_headers.set(_client_trace(request))
        return await handler(request)
    parent = propagate.extract(request.headers)
    with tracer.start_as_current_span(operation, context=parent, kind=trace.SpanKind.SERVER) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        upstream_trace_headers.set(tuple(carrier.items()))
        try:
            return await handler(request)
        finally:
            _finish(span, request, operation)


def _client_trace(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The client's own trace headers, if well formed (tracestate only with a traceparent, as the spec has it)."""
    parent = request.headers.get("traceparent", "")
    if not _TRACEPARENT.fullmatch(parent):
        return ()
    state = request.headers.get("tracestate", "")
    return (("traceparent", parent),) + ((("tracestate", state),) if _TRACESTATE.fullmatch(state) else ())


def _finish(span: Any, request: web.Request, operation: str) -> None:
    """Name the span and set its attributes and events from what the request turned out to be."""
    stats = request.get(REQUEST_STATS)
    model = (stats.model if stats else None) or NO_MODEL
    span.update_name(f"{operation} {model}")
    backend = (stats.backend if stats else None) or ""
    status = request.get(FINAL_STATUS, 500)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDERS.get(backend, backend or "unknown"),
        "gen_ai.request.model": model,
        "http.response.status_code": status,
    }
    body = request.get(BODY) or {}
    for field, name in _REQUEST_ATTRIBUTES.items():
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[name] = value
    if stats is not None:
        attributes["gen_ai.usage.input_tokens"] = stats.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = stats.completion_tokens
        _events(span, request, stats)
    if status >= 400:
        attributes["error.type"] = str(status)
        span.set_status(trace.StatusCode.ERROR)
    span.set_attributes(attributes)


def _events(span: Any, request: web.Request, stats: RequestTelemetry) -> None:
    """The request's moments, measured by perf_counter, as span events on the wall clock."""
    offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
    arrival = request.get(ARRIVAL)
    for name, moment in (
        ("gen_ai.queue.end", stats.admitted),
        ("gen_ai.first_token", stats.first_token),
        ("gen_ai.end", stats.end),
    ):
        if moment is not None:
            waited = {} if arrival is None else {"gen_ai.server.since_arrival_s": round(moment - arrival, 6)}
            span.add_event(name, waited, timestamp=offset_ns + int(moment * 1e9))
