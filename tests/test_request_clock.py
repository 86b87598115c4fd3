"""Where a request's clock starts: at the first byte of it that reached the machine, so that the server's TTFT and
e2e count everything its client waited for. Against the process we ship (its own listening sockets), and the
sockets themselves against the kernel."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from genai_server.http.first_byte import FirstBytes
from tests.harness.bodies import MODEL_ID
from tests.harness.process import ServerProcess
from tests.harness.waiting import eventually

# How long the slow client takes over each part of its request: long beside a token of the bundled model.
_PAUSE_S = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("clock") / "server.log") as proc:
        yield proc.wait_healthy()


def _request(body: dict[str, Any]) -> tuple[bytes, bytes]:
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head, payload


def _body(max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One whole HTTP/1.1 response with a Content-Length: its status line and its body."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _answer(reader: asyncio.StreamReader) -> dict[str, Any]:
    """One whole 200 response, as JSON."""
    status, body = await _response(reader)
    assert b" 200 " in status, status
    answer: dict[str, Any] = json.loads(body)
    return answer


async def test_a_slow_senders_wait_is_in_its_ttft_and_e2e(server: ServerProcess) -> None:
    """The request line, the headers and the body each come after a pause: the server's TTFT and e2e include the
    time the client took to send it (a clock started at the parsed headers would leave out two pauses), and are no
    longer than the client waited in all."""
    head, payload = _request(_body())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        started = time.perf_counter()
        for part in (head[:20], head[20:], payload):  # paced on purpose: a slow client is the stimulus
            writer.write(part)
            await writer.drain()
            if part is not payload:
                await asyncio.sleep(_PAUSE_S)
        sent = time.perf_counter() - started
        answer = await _answer(reader)
        waited_ms = (time.perf_counter() - started) * 1000
    finally:
        writer.close()
    metrics = answer["metrics"]
    assert sent * 1000 <= metrics["time_to_first_token_ms"] <= metrics["e2e_latency_ms"] <= waited_ms


async def test_each_request_on_a_kept_alive_connection_starts_its_own_clock(server: ServerProcess) -> None:
    """A second request sent on the same connection after it sat idle is timed from its own first byte: its TTFT
    includes the pause in its own sending, and its e2e is no longer than the client waited for it (not counted
    from the first request or the idle time)."""
    head, payload = _request(_body())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head + payload)
        await _answer(reader)
        await asyncio.sleep(_PAUSE_S)  # idle on purpose: that time belongs to no request
        second = await _paced(reader, writer, head + payload)
    finally:
        writer.close()
    assert second.sent_ms <= second.metrics["time_to_first_token_ms"]
    assert second.metrics["e2e_latency_ms"] <= second.waited_ms


async def test_a_body_left_unread_does_not_start_the_next_requests_clock(server: ServerProcess) -> None:
    """A request refused before its body was read (a 404): aiohttp still reads the rest of the body after the
    answer, on the same connection. Those bytes are not the next request's first: its e2e is no longer than the
    client waited for it, however long after them it comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20\r\n\r\n0123456789")
        status, _ = await _response(reader)
        assert b" 404 " in status, status
        writer.write(b"0123456789")  # the rest of the refused body, read after its answer
        await writer.drain()
        await asyncio.sleep(_PAUSE_S)  # idle on purpose, after those bytes
        head, payload = _request(_body())
        started = time.perf_counter()
        writer.write(head + payload)
        answer = await _answer(reader)
        waited_ms = (time.perf_counter() - started) * 1000
    finally:
        writer.close()
    assert answer["metrics"]["e2e_latency_ms"] <= waited_ms


@dataclass(frozen=True)
class _Paced:
    metrics: dict[str, Any]
    sent_ms: float  # how long the client took to send it
    waited_ms: float  # from its first byte sent to its answer read


async def _paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> _Paced:
    """``request`` sent in two parts with a pause between, and its answer."""
    started = time.perf_counter()
    writer.write(request[:20])
    await writer.drain()
    await asyncio.sleep(_PAUSE_S)  # paced on purpose: a slow client is the stimulus
    writer.write(request[20:])
    await writer.drain()
    sent = time.perf_counter()
    answer = await _answer(reader)
    done = time.perf_counter()
    return _Paced(answer["metrics"], (sent - started) * 1000, (done - started) * 1000)


@pytest.mark.skipif(
    sys.platform != "linux", reason="the kernel's receive stamps are Linux's; elsewhere, the read's time"
)
def test_the_kernels_stamp_counts_the_time_bytes_waited_unread() -> None:
    """Bytes that arrived while nobody read them (an event loop busy elsewhere) are dated when they arrived, not
    when they were read; and a later read of the same request leaves that date alone."""
    first_bytes = FirstBytes()
    [listening] = first_bytes.listening_sockets("127.0.0.1", 0)
    listening.listen()
    with listening:
        # Linux turns stamping on a moment after a socket first asks (a deferred work item): wait until it has.
        eventually(lambda: _first_byte_dated(listening, 0.02), what="the kernel stamping received segments")
        assert _first_byte_dated(listening, _PAUSE_S)


def _first_byte_dated(listening: socket.socket, pause_s: float) -> bool:
    """A connection whose first bytes wait ``pause_s`` in the kernel before they are read: whether their date is
    the time they were sent, and stays so through a later read."""
    with socket.create_connection(listening.getsockname()) as client:
        connection, _ = listening.accept()
        with connection:
            client.sendall(b"GET / HTTP/1.1\r\n")
            sent = time.perf_counter()
            time.sleep(pause_s)  # the bytes wait in the kernel's buffer: the stimulus, not a wait for a result
            read_at = time.perf_counter()
            assert connection.recv(1024) == b"GET / HTTP/1.1\r\n"
            stamp = getattr(connection, "first_byte", None)
            client.sendall(b"Host: x\r\n\r\n")
            assert connection.recv(1024) == b"Host: x\r\n\r\n"
            assert getattr(connection, "first_byte", None) == stamp
    return stamp is not None and sent - 0.05 <= stamp <= read_at - pause_s / 2
