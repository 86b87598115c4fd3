"""Traces: one GenAI span per generation request (the SDK's in-memory exporter in-process; a real process exporting
OTLP to a collector of the test's own), and the trace passed to an upstream."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from genai_server.app import create_app
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import make_settings
from tests.harness.process import ServerProcess
from tests.harness.upstream import USAGE, AppInThread, Reply, ScriptedUpstream, chunk, sse

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def _traced(exporter: InMemorySpanExporter, **settings: Any) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(create_app(make_settings(**settings), span_exporter=exporter))
    )
    await client.start_server()
    return client


async def test_one_genai_span_per_generation_request() -> None:
    exporter = InMemorySpanExporter()
    client = await _traced(exporter)
    try:
        ok = await client.post(
            "/v1/chat/completions",
            json=chat_body(max_tokens=5, temperature=0),
            headers={"traceparent": CLIENT_PARENT},
        )
        assert ok.status == 200
        usage = (await ok.json())["usage"]
        assert (await client.post("/v1/chat/completions", json=chat_body(temperature=-1))).status == 400
        assert (await client.get("/health")).status == 200
    finally:
        await client.close()  # the provider shuts down with the app: every span is flushed
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == [f"chat {MODEL_ID}", "chat -"], "one per generation request, no other"
    span, refused = spans
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID, "a child of the client's trace"
    assert span.attributes is not None
    assert {key: span.attributes[key] for key in ("gen_ai.operation.name", "gen_ai.provider.name")} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "onnxruntime_genai",
    }
    assert span.attributes["gen_ai.request.model"] == MODEL_ID
    assert span.attributes["gen_ai.request.max_tokens"] == 5 and span.attributes["gen_ai.request.temperature"] == 0
    assert span.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    events = [event.name for event in span.events]
    assert events == ["gen_ai.queue.end", "gen_ai.first_token", "gen_ai.end"]
    assert span.start_time is not None and span.end_time is not None
    stamps = [event.timestamp for event in span.events]
    assert stamps == sorted(stamps) and span.start_time <= stamps[0] and stamps[-1] <= span.end_time
    assert refused.attributes is not None and refused.attributes["error.type"] == "400"
    assert refused.status.status_code == StatusCode.ERROR


@pytest.fixture
async def recording_upstream() -> Any:
    """An OpenAI-style upstream that records the headers each request came with."""
    upstream = ScriptedUpstream({}, default=Reply(sse(chunk("Hi", "stop"), USAGE)))
    server = TestServer(upstream.app())
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/v1", upstream.headers
    await server.close()


@pytest.mark.parametrize("traced", [True, False])
async def test_the_gateway_passes_the_trace_upstream(recording_upstream: Any, traced: bool) -> None:
    """Traced: the upstream's parent is the gateway's span, in the client's trace. Not traced: the client's own
    headers go on unchanged, so an upstream's spans still join its trace."""
    url, seen = recording_upstream
    exporter = InMemorySpanExporter()
    settings = {"backend": "openai", "upstream_url": url, "model_id": "m"}
    client = await (_traced(exporter, **settings) if traced else _untraced(**settings))
    try:
        resp = await client.post(
            "/v1/chat/completions",
            json=chat_body(model="m"),
            headers={"traceparent": CLIENT_PARENT, "tracestate": "vendor=1"},
        )
        assert resp.status == 200
    finally:
        await client.close()
    sent = seen[-1]
    if not traced:
        assert (sent["traceparent"], sent["tracestate"]) == (CLIENT_PARENT, "vendor=1")
        return
    (span,) = exporter.get_finished_spans()
    assert sent["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"


@pytest.mark.parametrize(
    ("parent", "state", "relayed"),
    [
        ("00-not-a-trace", "vendor=1", []),  # a traceparent that is not one: neither goes on
        ("00-" + "0" * 32 + "-b7ad6b7169203331-01", "vendor=1", []),  # a trace id of zeros: invalid, the spec says
        ("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", "", []),  # a parent id of zeros
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "", []),  # version ff
        (CLIENT_PARENT, "v=" + "x" * 600, ["traceparent"]),  # a tracestate beyond the spec's 512 characters
        (CLIENT_PARENT, "v=caf\u00e9", ["traceparent"]),  # not printable ASCII
    ],
)
async def test_a_malformed_client_trace_is_not_relayed(
    recording_upstream: Any, parent: str, state: str, relayed: list[str]
) -> None:
    """What is not W3C Trace Context stays here (the request is served all the same)."""
    url, seen = recording_upstream
    client = await _untraced(backend="openai", upstream_url=url, model_id="m")
    try:
        headers = {"traceparent": parent, "tracestate": state}
        resp = await client.post("/v1/chat/completions", json=chat_body(model="m"), headers=headers)
        assert resp.status == 200
    finally:
        await client.close()
    assert [name for name in ("traceparent", "tracestate") if name in seen[-1]] == relayed


async def _untraced(**settings: Any) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(create_app(make_settings(**settings))))
    await client.start_server()
    return client


class Collector(AppInThread):
    """An OTLP/HTTP collector of the test's own, in a thread: keeps every ExportTraceServiceRequest it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ExportTraceServiceRequest] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        return web.Response(content_type="application/x-protobuf", body=b"")


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


async def test_a_real_process_exports_its_spans_over_otlp(collector: Collector, tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "server.log",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
        OTEL_SERVICE_NAME="genai-server-under-test",
    )
    try:
        server.wait_healthy()  # inside the try: a server that never comes up is still stopped
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{server.url}/v1/chat/completions", json=chat_body(max_tokens=3, stream=True)) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        server.proc.send_signal(signal.SIGTERM)  # the batch is flushed at shutdown
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    spans = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [span.name for _, span in spans] == [f"chat {MODEL_ID}"]
    resource = {attribute.key: attribute.value.string_value for attribute in spans[0][0].attributes}
    assert resource["service.name"] == "genai-server-under-test", "the standard variables are honoured"
