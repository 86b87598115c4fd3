"""Input limits and privacy: oversized bodies, too many messages or tokens, slow clients, prompts kept out of logs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import pytest

from tests.harness.bodies import MODEL_ID, chat_body, long_stream
from tests.harness.in_process import ClientFactory
from tests.harness.waiting import eventually_async


async def test_a_body_over_the_limit_is_413_in_the_envelope(make_client: ClientFactory, openai_schema: Any) -> None:
    client = await make_client(max_body_bytes=2048)
    resp = await client.post("/v1/chat/completions", json=chat_body(content="x" * 5000))
    assert resp.status == 413
    body = await resp.json()
    openai_schema("ErrorResponse", body)
    assert body["error"]["code"] == "request_too_large"
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


async def test_message_prompt_and_max_tokens_limits(make_client: ClientFactory) -> None:
    client = await make_client(max_messages=3, max_prompt_tokens=40, max_tokens_limit=16)
    many = chat_body()
    many["messages"] = [{"role": "user", "content": "hi"}] * 4
    resp = await client.post("/v1/chat/completions", json=many)
    assert (resp.status, (await resp.json())["error"]["param"]) == (400, "messages")

    long = await client.post("/v1/completions", json={"model": chat_body()["model"], "prompt": "word " * 100})
    error = (await long.json())["error"]
    assert (long.status, error["code"], error["param"]) == (400, "prompt_too_long", "prompt")

    too_many = await client.post("/v1/chat/completions", json=chat_body(max_tokens=17))
    assert (too_many.status, (await too_many.json())["error"]["param"]) == (400, "max_tokens")

    # No max_tokens: the limit is the cap, not the rest of the context.
    capped = await client.post("/v1/chat/completions", json={**chat_body(), "max_tokens": None})
    assert (await capped.json())["usage"]["completion_tokens"] <= 16


async def test_a_client_that_stops_sending_its_body_gets_408(make_client: ClientFactory) -> None:
    client = await make_client(request_read_timeout=0.2)
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 500\r\n\r\n{"model": '
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    await writer.wait_closed()


async def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(make_client: ClientFactory) -> None:
    from genai_server.http.app_keys import LIMITER

    client = await make_client(client_write_timeout=0.3, max_concurrent_requests=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((client.server.host, client.server.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock, limit=1024)
    # 16 choices of ~1900 tokens: megabytes of events, far more than the socket buffers hold.
    body = json.dumps({**long_stream(1900), "n": 16}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    writer.transport.pause_reading()  # type: ignore[attr-defined]  # the client never reads again

    async def dropped() -> float:
        """The disconnects counted, once there is one and the slot is free (0 until then)."""
        text = await (await client.get("/metrics")).text()
        disconnects = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("genai_server_client_disconnects_total")
        )
        return disconnects if disconnects and client.app[LIMITER].in_flight == 0 else 0.0

    disconnects = await eventually_async(dropped, timeout=60, what="the client dropped and its slot freed")
    # Dropped by the server while the client still holds its end open: only the write timeout does that.
    assert disconnects == 1
    assert client.app[LIMITER].in_flight == 0
    writer.close()
    await writer.wait_closed()
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


MARKER = "zebra-umbrella-4471"


async def test_prompts_and_completions_are_not_logged_by_default(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(log_level="DEBUG")
    resp = await client.post("/v1/chat/completions", json=chat_body(content=MARKER, max_tokens=5))
    completion = (await resp.json())["choices"][0]["message"]["content"]
    await client.post("/v1/chat/completions", json=chat_body(content=MARKER, stream=True))
    assert MARKER not in caplog.text
    assert completion.strip() == "" or completion not in caplog.text


async def test_a_setting_logs_them(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = await make_client(log_prompts=True)
    await client.post("/v1/chat/completions", json=chat_body(content=MARKER, max_tokens=5))
    records = [r for r in caplog.records if r.name == "genai_server.prompts"]
    assert records and MARKER in str(records[0].fields)  # type: ignore[attr-defined]


async def test_long_stream_helper_really_streams_long(client: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=long_stream(300))
    assert (await resp.text()).count('"finish_reason":"length"') == 1


@pytest.mark.parametrize(
    ("limits", "blamed"),
    [
        ({"max_completion_tokens": 64}, "max_completion_tokens"),
        ({"max_tokens": 64}, "max_tokens"),
        ({"max_tokens": 8, "max_completion_tokens": 64}, "max_completion_tokens"),  # the newer name wins
    ],
)
async def test_a_limit_beyond_the_context_is_blamed_on_the_parameter_sent(
    make_client: ClientFactory, limits: dict[str, int], blamed: str
) -> None:
    """The embedded engine with a 64-token context: a completion limit that fits MAX_TOKENS_LIMIT but not beside the
    prompt is a 400 naming the parameter the client used (``onnx.py`` decides it; ``protocol.py`` names it)."""
    client = await make_client(max_model_len=64)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello there"}], **limits}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", blamed)


async def test_a_limit_beyond_max_tokens_limit_is_blamed_on_the_parameter_sent(make_client: ClientFactory) -> None:
    """MAX_TOKENS_LIMIT is checked before any backend (``serving.py``), and blames the same parameter."""
    client = await make_client(max_tokens_limit=16)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 17}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_completion_tokens"
