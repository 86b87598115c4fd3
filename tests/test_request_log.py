"""Request ids and the one access-log line per request."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.harness.bodies import chat_body


async def test_request_id_is_echoed_or_generated(client: Any) -> None:
    given = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert given.headers["X-Request-Id"] == "abc-123"
    fresh = await client.get("/health")
    assert len(fresh.headers["X-Request-Id"]) == 32
    unsafe = await client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-Id"] != "bad id\twith spaces"


async def test_streams_and_errors_carry_the_request_id(client: Any) -> None:
    stream = await client.post("/v1/chat/completions", json=chat_body(stream=True), headers={"X-Request-Id": "s-1"})
    assert stream.headers["X-Request-Id"] == "s-1"
    await stream.read()
    error = await client.post("/v1/chat/completions", json={}, headers={"X-Request-Id": "e-1"})
    assert error.status == 400
    assert error.headers["X-Request-Id"] == "e-1"


async def test_one_log_line_per_request_with_tokens_and_inference_time(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="genai_server.access")
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3), headers={"X-Request-Id": "r-9"})
    assert resp.status == 200
    await client.get("/nope")
    records = [r for r in caplog.records if r.name == "genai_server.access"]
    assert len(records) == 2
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "r-9"
    assert (fields["method"], fields["path"], fields["status"]) == ("POST", "/v1/chat/completions", 200)
    assert fields["completion_tokens"] == 3
    assert fields["prompt_tokens"] > 0
    assert fields["inference_time_ms"] > 0
    assert records[1].fields["status"] == 404  # type: ignore[attr-defined]
