"""The endpoint table as a client meets it: a method a route does not have, a route that does not exist, and what
such a request counts as; and the finished-request record as its sinks show it (access line, metrics, span)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genai_server.app import create_app
from genai_server.http.app_keys import LIMITER
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import make_settings
from tests.harness.process import ServerProcess
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually

ACCESS = "genai_server.access"


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == ACCESS]  # type: ignore[attr-defined]


async def test_a_method_the_route_lacks_is_405_with_allow(client: Any) -> None:
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"].split(",")
    error = (await resp.json())["error"]
    assert error["code"] == "method_not_allowed" and error["type"] == "invalid_request_error"


async def test_an_unknown_route_is_named_in_its_404(client: Any) -> None:
    resp = await client.post("/v1/assistants", json={"model": MODEL_ID, "name": "hi"})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["message"] == "Invalid URL (POST /v1/assistants)"
    assert error["code"] == "not_found" and error["param"] is None
    assert "Allow" not in resp.headers


async def test_an_unknown_route_is_named_without_the_bytes_a_path_can_smuggle(client: Any) -> None:
    """A decoded path can hold line breaks, NUL or terminal escapes: the message shows them escaped, and short."""
    resp = await client.get("/v1/x%0Ay%00z%1b[31m" + "a" * 5000)
    assert resp.status == 404
    message = (await resp.json())["error"]["message"]
    assert message.startswith("Invalid URL (GET /v1/x\\x0ay\\x00z\\x1b[31m")
    assert message.isprintable() and len(message) < 300


async def test_head_is_answered_where_get_is_and_a_wrong_method_on_a_public_path_is_405(make_client: Any) -> None:
    client = await make_client(api_keys="k1")
    assert (await client.head("/health")).status == 200, "public, as GET is"
    assert (await client.head("/v1/models")).status == 401, "behind the key, as GET is"
    assert (await client.head("/v1/models", headers={"Authorization": "Bearer k1"})).status == 200
    wrong = await client.post("/health")
    assert wrong.status == 405, "a public path tells its methods without a key"
    assert set(wrong.headers["Allow"].split(",")) >= {"GET", "HEAD"}
    assert (await client.post("/v1/models")).status == 401, "a private path tells nothing without a key"


async def test_an_unknown_model_is_not_an_unknown_route(client: Any) -> None:
    """A client tells the two apart by the error: the model's 404 names the model."""
    resp = await client.post("/v1/chat/completions", json=chat_body(model="no-such-model"))
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_a_get_on_a_generation_path_is_not_a_generation_request(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    assert (await client.get("/v1/chat/completions")).status == 405
    assert (await client.get("/v1/completions")).status == 405
    text = await (await client.get("/metrics")).text()
    assert 'status="405"' not in text, "not counted in genai_server_requests_total"
    assert "gen_ai_server_request_duration_seconds_count{" not in text, "nor in the semconv duration histogram"
    assert client.app[LIMITER].in_flight == 0
    lines = [line for line in _access_lines(caplog) if line["status"] == 405]
    assert len(lines) == 2 and all("model" not in line for line in lines)
    # A POST is, and is counted once.
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status == 200
    text = await (await client.get("/metrics")).text()
    assert metric_sample(text, "genai_server_requests_total", model=MODEL_ID, status="200") == 1


async def test_the_access_line_of_a_refusal_names_its_code_param_and_model(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client = await make_client(max_tokens_limit=16)
    too_many = await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=999))
    assert too_many.status == 400
    unknown = await client.post("/v1/chat/completions", json=chat_body(model="not-served"))
    assert unknown.status == 404
    ok = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    assert ok.status == 200
    refused, missing, served = _access_lines(caplog)
    assert (refused["status"], refused["code"], refused["param"]) == (400, "invalid_parameter", "max_completion_tokens")
    assert refused["model"] == MODEL_ID
    assert (missing["status"], missing["code"], missing["param"], missing["model"]) == (
        404,
        "model_not_found",
        "model",
        "not-served",
    )
    assert "code" not in served
    assert served["ttft_ms"] > 0 and served["queue_time_ms"] >= 0
    assert served["ttft_ms"] <= served["duration_ms"]


async def test_the_access_line_of_a_429_names_the_model_it_asked_for(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client = await make_client(max_concurrent_requests=1, max_queued_requests=0)
    stream = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1900, stream=True))
    assert stream.status == 200
    refused = await client.post("/v1/chat/completions", json=chat_body(model="asked-for"))
    assert refused.status == 429
    stream.close()
    line = next(line for line in _access_lines(caplog) if line["status"] == 429)
    assert (line["code"], line["model"]) == ("rate_limit_exceeded", "asked-for")


async def test_a_span_carries_max_tokens_sent_as_max_completion_tokens() -> None:
    exporter = InMemorySpanExporter()
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(create_app(make_settings(), span_exporter=exporter))
    )
    await client.start_server()
    try:
        body = chat_body(max_completion_tokens=4)
        del body["max_tokens"]
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    finally:
        await client.close()  # the provider shuts down with the app: every span is flushed
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["gen_ai.request.max_tokens"] == 4


# ---- the process we ship -----------------------------------------------------------------------------------------


def test_the_real_process_routes_names_and_records_as_the_table_says(tmp_path: Path) -> None:
    """``python -m genai_server`` (web.run_app, not the test server): HEAD where GET is, a 405 with Allow that is
    not a generation request, a named 404 with escaped bytes, and a refusal's access line with its code, param and
    model, in the JSON log an operator reads."""
    with ServerProcess(tmp_path / "server.log", API_KEYS="k1", LOG_FORMAT="json") as server:
        server.wait_healthy()  # inside the with: a server that never comes up is still stopped
        key = {"Authorization": "Bearer k1"}
        assert requests.head(server.url + "/health", timeout=30).status_code == 200
        wrong = requests.get(server.url + "/v1/chat/completions", headers=key, timeout=30)
        assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"].split(",")
        missing = requests.post(server.url + "/v1/x%0Ay", headers=key, timeout=30)
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/x\\x0ay)"
        refused = requests.post(
            server.url + "/v1/chat/completions", json=chat_body(model="not-served"), headers=key, timeout=30
        )
        assert refused.status_code == 404
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        assert 'status="405"' not in metrics and 'status="404"' in metrics

        def access_line() -> dict[str, Any] | None:
            lines = [json.loads(line) for line in server.log_lines() if '"genai_server.access"' in line]
            return next((line for line in lines if line.get("code") == "model_not_found"), None)

        line = eventually(access_line, what="the refusal's access line")
    assert (line["status"], line["param"], line["model"]) == (404, "model", "not-served")
