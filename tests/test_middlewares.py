"""Each middleware mounted alone (with error mapping, which turns its refusals into envelopes) on a bare
``web.Application`` with scripted endpoints: no model, no backend, one concern at a time. The whole chain, in the
order ``create_app`` writes, is tested everywhere else against the real server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel

from genai_server.http.auth import setup_api_keys
from genai_server.http.concurrency import ConcurrencyLimiter, setup_concurrency_limit
from genai_server.http.cors import setup_cors
from genai_server.http.endpoints import Endpoint, add_endpoints
from genai_server.http.error_mapping import setup_error_mapping
from genai_server.http.request_body import setup_request_body
from genai_server.http.request_record import setup_request_record
from genai_server.http.request_state import BODY
from genai_server.telemetry.prometheus import Gauges, ServerMetrics
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually_async


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "body": request.get(BODY)})


def _app(*endpoints: Endpoint) -> web.Application:
    """A bare app with error mapping (outermost, as in create_app) and the endpoints; a test adds one middleware
    after it."""
    app = web.Application()
    setup_error_mapping(app)
    add_endpoints(app, endpoints)
    return app


GENERATE = Endpoint("POST", "/gen", _ok, "generates", operation="chat")
OPEN = Endpoint("GET", "/open", _ok, "public", public=True)
PRIVATE = Endpoint("GET", "/private", _ok, "private")


async def test_api_keys_follow_the_table(aiohttp_client: Any) -> None:
    app = _app(OPEN, GENERATE)
    setup_api_keys(app, ["k1"])
    client = await aiohttp_client(app)
    assert (await client.get("/open")).status == 200
    assert (await client.head("/open")).status == 200, "HEAD where GET is, public as it is"
    refused = await client.post("/gen")
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert (await refused.json())["error"]["code"] == "invalid_api_key"
    assert (await client.post("/gen", headers={"Authorization": "Bearer k1"})).status == 200
    # A path with no endpoint is not public: no key, no answer about what exists.
    assert (await client.get("/elsewhere")).status == 401
    named = await client.get("/elsewhere", headers={"Authorization": "Bearer k1"})
    assert named.status == 404
    assert (await named.json())["error"]["message"] == "Invalid URL (GET /elsewhere)"


async def test_error_mapping_keeps_allow(aiohttp_client: Any) -> None:
    client = await aiohttp_client(_app(GENERATE))
    wrong = await client.put("/gen")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"


async def test_request_body_reads_the_bodies_of_routes_that_take_one_only(aiohttp_client: Any) -> None:
    declared = Endpoint("POST", "/count", _ok, "takes a body", request_model=BaseModel)
    app = _app(GENERATE, OPEN, declared)
    setup_request_body(app, read_timeout_s=5, max_body_bytes=1 << 20)
    client = await aiohttp_client(app)
    ok = await client.post("/gen", json={"model": "m"})
    assert (await ok.json())["body"] == {"model": "m"}, "read and checked before the handler"
    not_json = await client.post("/gen", data=b"model=m", headers={"Content-Type": "text/plain"})
    assert not_json.status == 415
    nan = await client.post("/gen", data=b'{"temperature": NaN}', headers={"Content-Type": "application/json"})
    assert nan.status == 400 and (await nan.json())["error"]["code"] == "invalid_json"
    assert (await (await client.get("/open")).json())["body"] is None, "other routes are left alone"
    counted = await client.post("/count", json={"model": "m"})
    assert (await counted.json())["body"] == {"model": "m"}, "a route that declares its body, generating or not"


async def test_the_concurrency_limit_holds_generation_routes_only(aiohttp_client: Any) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    limiter = ConcurrencyLimiter(1, max_queued=0)
    app = _app(Endpoint("POST", "/gen", held, "generates", operation="chat"), OPEN)
    setup_concurrency_limit(app, limiter)
    client = await aiohttp_client(app)
    first = asyncio.create_task(client.post("/gen"))
    await eventually_async(lambda: limiter.in_flight == 1, what="the first request holding the slot")
    refused = await client.post("/gen")
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1" and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert (await client.get("/open")).status == 200, "a route that does not generate never waits"
    release.set()
    assert (await first).status == 200
    assert limiter.in_flight == 0


async def test_the_request_record_reaches_the_access_log_and_metrics(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="genai_server.access")
    metrics = ServerMetrics(lambda: Gauges(running=0, waiting=0, kv_cache_usage={}, gpu_used_mb=None))
    app = web.Application()
    setup_request_record(app, metrics, default_backend="onnx", span_exporter=None)
    setup_error_mapping(app)
    add_endpoints(app, (GENERATE, OPEN))
    client = await aiohttp_client(app)
    assert (await client.post("/gen", headers={"X-Request-Id": "r-1"})).headers["X-Request-Id"] == "r-1"
    assert (await client.get("/open")).status == 200
    assert (await client.get("/gen")).status == 405
    lines = [record.fields for record in caplog.records if record.name == "genai_server.access"]  # type: ignore[attr-defined]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/gen", 200),
        ("GET", "/open", 200),
        ("GET", "/gen", 405),
    ]
    assert lines[0]["request_id"] == "r-1" and lines[0]["model"] is None
    assert lines[2]["code"] == "method_not_allowed" and "model" not in lines[2]
    text = metrics.exposition().decode()
    assert metric_sample(text, "genai_server_requests_total", model="-", backend="onnx", status="200") == 1
    assert 'status="405"' not in text, "only the generation request is counted"


async def test_cors_wraps_every_endpoint_and_unrouted_errors(aiohttp_client: Any) -> None:
    app = _app(GENERATE, OPEN)
    setup_cors(app, ["https://app.example"])
    client = await aiohttp_client(app)
    origin = {"Origin": "https://app.example"}
    preflight = await client.options("/gen", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 200 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    for resp in (await client.post("/gen", headers=origin), await client.get("/nowhere", headers=origin)):
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Access-Control-Allow-Origin" not in (await client.get("/open", headers={"Origin": "https://evil"})).headers
