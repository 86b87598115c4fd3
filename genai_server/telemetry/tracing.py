"""Traces: one OpenTelemetry span per generation request, exported over OTLP, and ``traceparent`` passed upstream.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the SDK reads the other standard variables itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``, ...). The span follows the GenAI
semantic conventions: named ``{gen_ai.operation.name} {gen_ai.request.model}``, kind SERVER, a child of the
client's ``traceparent`` if it sent one, with the request and usage attributes and three events on this server's
clock: ``gen_ai.queue.end`` (generation starts), ``gen_ai.first_token`` and ``gen_ai.end``. Spans are exported by
the SDK's batch processor on a thread of its own, never on the event loop.

A relayed request carries the trace to the upstream (vLLM reads ``traceparent``): the span's own context when
tracing is on, otherwise the client's headers as they came, so an upstream's spans still join the client's trace.
The span is opened and finished by the HTTP layer's outermost middleware, from the finished request's record; this
module knows nothing of the web app.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from genai_server.telemetry.genai import REQUEST_ATTRIBUTES, error_type, provider_name
from genai_server.telemetry.record import RequestRecord
from genai_server.telemetry.trace_context import upstream_trace_headers

# What a client's trace headers must look like to be passed upstream untraced (W3C Trace Context: a version-00
# traceparent, a tracestate of at most 512 printable ASCII characters). Anything else is dropped, as the spec has a
# receiver drop what it cannot parse: a client's arbitrary bytes are not forwarded to an engine as trace context.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")


def otlp_exporter(endpoint: str) -> SpanExporter:
    """The OTLP/HTTP exporter for the generic endpoint: traces go to its /v1/traces (the spec's rule). The exporter
    reads the other OTEL_EXPORTER_OTLP_* variables (headers, timeout, certificate) itself."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def tracer_provider(exporter: SpanExporter) -> TracerProvider:
    """A provider of the server's own, not the global one: two servers in one process (the tests) never share
    spans. Its ``shutdown`` flushes what is left."""
    provider = TracerProvider(resource=_resource())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES as the SDK reads them; "genai-server" where they name no service
    (the SDK would say "unknown_service")."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "genai-server"}))
    return resource


@contextmanager
def generation_span(
    tracer: trace.Tracer | None, operation: str, headers: Mapping[str, str]
) -> Iterator[trace.Span | None]:
    """The span of one generation request (None when tracing is off), current while the request runs, and the
    trace headers its upstream requests carry."""
    if tracer is None:
        upstream_trace_headers.set(_client_trace(headers))
        yield None
        return
    parent = propagate.extract(headers)
    with tracer.start_as_current_span(operation, context=parent, kind=trace.SpanKind.SERVER) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        upstream_trace_headers.set(tuple(carrier.items()))
        yield span


def _client_trace(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The client's own trace headers, if well formed (tracestate only with a traceparent, as the spec has it)."""
    parent = headers.get("traceparent", "")
    if not _TRACEPARENT.fullmatch(parent) or not _valid_ids(parent):
        return ()
    state = headers.get("tracestate", "")
    return (("traceparent", parent),) + ((("tracestate", state),) if _TRACESTATE.fullmatch(state) else ())


def _valid_ids(parent: str) -> bool:
    """The spec's other rules: version ff is invalid, and so is a trace id or parent id of all zeros."""
    version, trace_id, parent_id, _ = parent.split("-")
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16


def finish_span(span: trace.Span, record: RequestRecord) -> None:
    """Name the span and set its attributes and events from the finished request."""
    span.update_name(f"{record.operation} {record.model_label}")
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": record.operation,
        "gen_ai.provider.name": provider_name(record.backend),
        "gen_ai.request.model": record.model_label,
        "http.response.status_code": record.status,
    }
    for field, value in record.request_attributes.items():
        attributes[REQUEST_ATTRIBUTES[field]] = value
    if record.figures is not None:
        attributes["gen_ai.usage.input_tokens"] = record.figures.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.figures.completion_tokens
    _events(span, record)
    if error_type(record.status):
        attributes["error.type"] = error_type(record.status)
        span.set_status(trace.StatusCode.ERROR)
    span.set_attributes(attributes)


def _events(span: trace.Span, record: RequestRecord) -> None:
    """The request's moments, measured by perf_counter, as span events on the wall clock."""
    offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
    for name, moment in (
        ("gen_ai.queue.end", record.moments.admitted),
        ("gen_ai.first_token", record.moments.first_token),
        ("gen_ai.end", record.moments.end),
    ):
        if moment is not None:
            waited = {"gen_ai.server.since_arrival_s": round(moment - record.moments.arrival, 6)}
            span.add_event(name, waited, timestamp=offset_ns + int(moment * 1e9))
