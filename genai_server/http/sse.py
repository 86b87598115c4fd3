"""Server-sent events: write a chunk stream as ``data: {json}`` events ending with ``data: [DONE]`` (chat and
completions), or as named events (``event: <type>``), as the Responses and Anthropic Messages APIs write them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from genai_server.errors import APIError
from genai_server.http.error_mapping import log_server_error, to_api_error
from genai_server.http.request_state import StreamOutcome
from genai_server.protocol import json_bytes

log = logging.getLogger(__name__)

_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the stream
}
_DONE = b"data: [DONE]\n\n"
# An SSE comment: clients skip it, idle proxies see bytes (nginx's proxy_read_timeout is 60 s, many LBs' 60 s).
_KEEP_ALIVE = b": keep-alive\n\n"


def _envelope(error: APIError) -> list[dict[str, Any]]:
    return [error.envelope()]


@dataclass(frozen=True)
class SseDialect:
    """How an API writes its stream: whether each event is named (``event: <its type>``), what ends a stream, and
    the events an error after the start becomes."""

    named: bool = False
    done: bytes = _DONE
    error_events: Callable[[APIError], list[dict[str, Any]]] = _envelope

    def event(self, chunk: BaseModel | dict[str, Any]) -> bytes:
        """One event's bytes."""
        data = b"data: " + json_bytes(chunk) + b"\n\n"
        if self.named and isinstance(chunk, dict):
            return f"event: {chunk['type']}\n".encode() + data
        return data


# Chat and completions: unnamed events, then ``data: [DONE]``; an error is the OpenAI envelope.
CHAT_SSE = SseDialect()


async def write_sse(
    request: web.Request,
    chunks: AsyncGenerator[BaseModel | dict[str, Any], None],
    write_timeout: float | None = None,
    keep_alive_s: float = 0.0,
    dialect: SseDialect = CHAT_SSE,
) -> tuple[web.StreamResponse, StreamOutcome]:
    """Stream ``chunks`` as ``dialect`` writes them; an error after the stream started is sent as its error events,
    then its end (the response's own status, 200, left with the headers). Returns the response and how the stream
    ended. After ``keep_alive_s`` seconds without an event (a long prefill on a CPU, an upstream's silence) an SSE
    comment goes out, so that an idle proxy does not cut the stream (0: never).

    A client that disconnects ends the loop with ``ConnectionResetError``; closing ``chunks`` then cancels its
    generation at once. One that disconnects while a write waits cancels the handler (aiohttp), which the
    request-record middleware counts as a client that left.
    """
    response = web.StreamResponse(headers=_HEADERS)
    outcome = StreamOutcome()
    written = _LastWrite()
    keep_alive: asyncio.Task[None] | None = None
    try:
        await response.prepare(request)  # inside: a client gone already still has its generation closed below
        if keep_alive_s > 0:
            keep_alive = asyncio.create_task(_keep_alive(response, written, keep_alive_s))
        async for chunk in chunks:
            await _write(request, response, dialect.event(chunk), write_timeout)
            written.at = written.clock()
        if keep_alive is not None:
            keep_alive.cancel()
        if dialect.done:
            await response.write(dialect.done)
    except (ConnectionResetError, TimeoutError) as exc:
        # Gone, or not reading: a client that stalls its socket must not hold a slot forever.
        log.info("client %s mid-stream", "stopped reading" if isinstance(exc, TimeoutError) else "disconnected")
        if request.transport is not None:
            request.transport.close()
        return response, StreamOutcome(client_left=True)
    except Exception as exc:  # noqa: BLE001  # every fault becomes an error event; log_server_error logs it
        error = to_api_error(exc)
        log_server_error(exc, error, "during a stream")
        outcome = StreamOutcome(error=error)
        await _write_error(response, b"".join(map(dialect.event, dialect.error_events(error))) + dialect.done)
    finally:
        if keep_alive is not None:
            keep_alive.cancel()
        await chunks.aclose()
    with contextlib.suppress(ConnectionResetError):  # a client gone after an error event: the error stands
        await response.write_eof()
    return response, outcome


class _LastWrite:
    """When the stream last sent an event: set per event (a float, nothing more on the hot path), read by the
    keep-alive task."""

    def __init__(self) -> None:
        self.clock = asyncio.get_running_loop().time
        self.at = self.clock()


async def _keep_alive(response: web.StreamResponse, written: _LastWrite, interval: float) -> None:
    """Send a comment whenever ``interval`` seconds have passed without an event; a client gone ends it quietly
    (the stream's own write finds out and ends the generation)."""
    with contextlib.suppress(ConnectionResetError, RuntimeError):  # gone, or the stream ended under it
        while True:
            await asyncio.sleep(max(0.0, written.at + interval - written.clock()))
            if written.clock() - written.at >= interval:
                await response.write(_KEEP_ALIVE)
                written.at = written.clock()


async def _write(request: web.Request, response: web.StreamResponse, data: bytes, timeout: float | None) -> None:
    """Write one event; only a write that may wait (the socket's buffer not empty: the client is behind) is timed.
    A timer per event cost a tenth of the gateway's CPU (py-spy, ~47k chunks/s), and an empty buffer cannot block:
    the transport pauses writers only above its high-water mark."""
    transport = request.transport
    if transport is not None and not transport.get_write_buffer_size():
        await response.write(data)
        return
    async with asyncio.timeout(timeout):
        await response.write(data)


async def _write_error(response: web.StreamResponse, events: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(events)
