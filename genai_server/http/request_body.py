"""Middleware: a request's JSON body (generation routes, and the others that take one), read whole and checked before
the request may take or wait for a concurrency slot.

Why before the slot: a client that trickles its body one byte at a time must not hold a slot (or a place in the
queue) while it does; it holds a connection only, until REQUEST_READ_TIMEOUT. Why checked here: whatever JSON
allows but nothing downstream can take is refused once, as a 400 naming the parameter — nesting deep enough to
exhaust the recursion limit of anything that walks it, ``NaN``/``Infinity`` (not JSON, but Python's parser takes
them), and lone UTF-16 surrogates (``"\\ud800"``), which no tokenizer or UTF-8 encoder can take.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from genai_server.errors import InvalidRequest, RequestTimeout, UnsupportedMediaType
from genai_server.http.endpoints import takes_json
from genai_server.http.request_state import BODY

# Deeper than any real request (a tool's JSON schema included), far below Python's recursion limit.
MAX_JSON_DEPTH = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**64 - 1  # what a JSON writer of 64-bit integers can write back (orjson)


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"The body is not valid JSON: {name} is not a JSON value", code="invalid_json")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, checked for depth and for text no encoder can take."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest(f"The body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object", code="invalid_json")
    _check_values(body)
    return body


def _check_values(body: dict[str, Any]) -> None:
    """Walk the document without recursion: its depth, and every string (keys included) as valid UTF-8 text."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"The body is nested deeper than {MAX_JSON_DEPTH} levels", param=path or None, code="invalid_json"
            )
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            # Python's parser takes any integer; the JSON writers downstream (orjson) and every engine stop at 64 bits:
            # an echoed or kept value past them failed after the generation had run.
            raise InvalidRequest("Integers must fit in 64 bits", param=path or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "Text must be valid Unicode: a lone UTF-16 surrogate cannot be encoded", param=path or None
        ) from None


def setup_request_body(app: web.Application, read_timeout_s: float, max_body_bytes: int) -> None:
    """Add the middleware that reads and checks JSON bodies (``request[BODY]``) before the slot."""

    @web.middleware
    async def request_body(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if takes_json(request):
            request[BODY] = await _read(request, read_timeout_s, max_body_bytes)
        return await handler(request)

    app.middlewares.append(request_body)


async def _read(request: web.Request, read_timeout_s: float, max_body_bytes: int) -> dict[str, Any]:
    """Not JSON -> 415; slower than the timeout -> 408; larger than MAX_BODY_BYTES -> 413 (declared: before a byte
    is read; sent: aiohttp's own)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not '{request.content_type}'"[:200])
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_body_bytes, actual_size=request.content_length)
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after it
    try:
        async with asyncio.timeout(read_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout("The request body did not arrive in time") from None
    return parse_json(raw)
