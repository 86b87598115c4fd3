"""The HTTP client of one upstream address: its session, posting, probing, and turning HTTP faults and error
bodies into our typed errors. It knows nothing of replicas or retries (``replicas.py``, ``relay.py``).

Every byte from an upstream is untrusted: error bodies are read up to a few KB, redirects are not followed, its
credentials problems are ours (502), and neither its URL nor aiohttp's internals reach a client (they are logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp import http_exceptions

from genai_server.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from genai_server.shown_urls import shown_url, with_path, without_secrets
from genai_server.telemetry.trace_context import upstream_trace_headers

log = logging.getLogger(__name__)

# An upstream's error body is read up to this many bytes: enough for any real error message.
ERROR_BODY_LIMIT = 8192
# An upstream's error message passed on to the client (a 4xx, an error event) is cut to this many characters.
_MESSAGE_LIMIT = 500
# Readiness is asked of the upstream at most this often; probes in between get the last answer.
_READY_CACHE_S = 1.0
_READY_TIMEOUT_S = 2.0
_PROBE_CONNECTIONS = 2
# Idle upstream connections are closed after this long: shorter than upstreams keep them (llama-server 5 s, uvicorn
# under vLLM 5 s), so that the gateway rarely reuses one the upstream is closing.
UPSTREAM_KEEPALIVE_S = 4.0


class TrackedResponse(aiohttp.ClientResponse):
    """A response that says when it is closed (every relay closes its response when it ends): a replica counts the
    requests it has in flight by it."""

    on_close: Callable[[], None] | None = None

    def close(self) -> None:
        super().close()
        done, self.on_close = self.on_close, None
        if done is not None:
            done()


class UpstreamClient:
    """One upstream engine's HTTP session, owned from ``start`` to ``close``."""

    def __init__(
        self, base_url: str, timeout: aiohttp.ClientTimeout, *, headers: dict[str, str] | None = None, probe_path: str
    ) -> None:
        # A query in the address (Azure's ?api-version=) goes after each request's path, not before it.
        self._address = base_url
        parts = urlsplit(base_url)
        # vLLM's and llama-server's /tokenize and /detokenize sit beside /v1, not under it.
        self._root_address = urlunsplit(parts._replace(path=parts.path.rstrip("/").removesuffix("/v1")))
        self.base_url = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.shown_url = shown_url(self.base_url)  # what logs and error details say: no credentials
        self._timeout = timeout
        self._headers = headers or {}
        self._probe_path = probe_path
        self._session: aiohttp.ClientSession | None = None
        # Probes have a small pool of their own: a flood of readiness checks must not take real traffic's
        # connections (a chat went from 4 ms to 2 s), nor real traffic delay the probe.
        self._probe_session: aiohttp.ClientSession | None = None
        self._ready: tuple[float, bool] = (float("-inf"), False)
        self._probing: asyncio.Task[bool] | None = None

    async def start(self) -> None:
        """Open the session (no connection is made until the first request). Bodies are asked for and taken as
        they are sent, never decompressed: 10 KB of gzip that inflates to gigabytes of blank lines froze the event
        loop for 16 s (aiohttp inflates a whole received chunk at once)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={"Accept-Encoding": "identity", **self._headers},
            response_class=TrackedResponse,
            auto_decompress=False,
            connector=aiohttp.TCPConnector(keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            trace_configs=[_reuse_tracing()],
        )
        self._probe_session = aiohttp.ClientSession(
            headers={"Accept-Encoding": "identity", **self._headers},
            connector=aiohttp.TCPConnector(limit=_PROBE_CONNECTIONS),
            auto_decompress=False,
        )

    async def close(self) -> None:
        """Close the sessions: relayed streams still open lose their upstream and end with an error."""
        if self._probing is not None:
            self._probing.cancel()
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()

    async def ready(self) -> bool:
        """Whether the upstream answers (any status below 500) on its probe path; cached for a second, and asked
        once however many ask at the same time (each public /health/ready used to start a probe of its own)."""
        checked_at, answer = self._ready
        if time.monotonic() - checked_at < _READY_CACHE_S:
            return answer
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe_and_keep())
        probing = self._probing
        try:
            # Shielded: a caller that leaves (its client gone) must not cancel the probe the others wait for.
            return await asyncio.shield(probing)
        except asyncio.CancelledError:
            if probing.cancelled():  # the probe itself was stopped (the client closing), not this caller
                return False
            raise

    async def _probe_and_keep(self) -> bool:
        answer = await self.probe()
        self._ready = (time.monotonic(), answer)
        return answer

    async def probe(self) -> bool:
        """Ask the upstream now whether it answers (any status below 500) on its probe path."""
        session = self._probe_session
        if session is None or session.closed:
            return False
        try:
            async with session.get(
                with_path(self._address, self._probe_path),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=_READY_TIMEOUT_S),
            ) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Logged by the replica set when the answer changes, not at every probe.
            reason = without_secrets(repr(exc), self._address)
            log.debug("upstream not ready", extra={"fields": {"upstream_url": self.shown_url, "reason": reason}})
            return False

    async def post(
        self, path: str, body: dict[str, Any] | None, *, at_root: bool = False, method: str = "POST"
    ) -> aiohttp.ClientResponse:
        """POST ``body`` (or send ``method``, GET and DELETE with no body) to ``path`` under the base URL
        (``at_root``: under its root, the base without ``/v1``); refused -> 502, no answer in time -> 504, an
        error status -> its ``UpstreamRejected``/502."""
        if self._session is None or self._session.closed:
            raise UpstreamUnavailable("The upstream engine cannot be reached")
        address = self._root_address if at_root else self._address
        url, shown = with_path(address, path), shown_url(with_path(address, path))
        try:
            # The request's trace goes upstream with it (tracing.py), as vLLM and SGLang read it.
            headers = dict(upstream_trace_headers.get())
            response = await self._post_once_more_if_stale(method, url, body, headers)
        except aiohttp.ClientConnectorError as exc:
            cause = {"upstream_url": shown, "cause": without_secrets(str(exc.os_error), url)}
            raise UpstreamUnavailable("The upstream engine cannot be reached", detail=cause) from None
        except TimeoutError:
            cause = {"upstream_url": shown, "cause": "no answer in time"}
            raise UpstreamTimeout("The upstream engine did not answer in time", detail=cause) from None
        except (aiohttp.ClientError, http_exceptions.HttpProcessingError, ValueError) as exc:
            cause = {"upstream_url": shown, "cause": without_secrets(repr(exc), url)}
            raise UpstreamError("The upstream engine failed", detail=cause) from None
        if response.status >= 300:
            raise await _rejection(response, shown)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            cause = {"upstream_url": shown, "content_encoding": encoding[:50]}
            raise UpstreamError(
                "The upstream engine sent a compressed body; the gateway asks for and reads only plain ones",
                detail=cause,
            )
        return response

    async def _post_once_more_if_stale(
        self, method: str, url: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Post; if the request went out on a kept-alive connection that turned out closed (an upstream that closed
        it just as it was reused: 2 of 40 requests in front of llama-server) and no byte of an answer came, post
        once more, which takes a fresh connection. Only then: on a fresh connection a disconnect may be the
        upstream dying of this very request (an engine's crash or OOM), which must not be sent twice."""
        assert self._session is not None
        reuse: dict[str, bool] = {}
        try:
            return await self._session.request(
                method, url, json=body, allow_redirects=False, headers=headers, trace_request_ctx=reuse
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            stale = reuse.get("reused", False) and not isinstance(exc, aiohttp.ClientConnectorError)
            if not stale or self._session.closed:
                raise
            log.info("a kept-alive upstream connection was closed under a request: posted again on a fresh one")
            return await self._session.request(method, url, json=body, allow_redirects=False, headers=headers)


async def _mark_reused(_session: Any, context: Any, _params: Any) -> None:
    """aiohttp's trace hook: the request's connection came from the pool (it had served a request before)."""
    if isinstance(context.trace_request_ctx, dict):
        context.trace_request_ctx["reused"] = True


def _reuse_tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_mark_reused)
    return trace


async def _rejection(response: aiohttp.ClientResponse, url: str) -> Exception:
    """The upstream's error answer as ours: its 4xx passed on with its message; its 5xx, a redirect or a refusal
    of the gateway's own credentials (401/403) as a 502."""
    try:
        raw = await response.content.read(ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, http_exceptions.HttpProcessingError, TimeoutError):
        raw = b""
    finally:
        response.close()
    error = _error_object(raw)
    message = error_message(error) or response.reason or "no message"
    status = response.status
    if status < 400 or status in (401, 403) or status >= 500:
        # A refusal of our credentials may echo them: its message is not logged, only its status.
        shown = "(not logged)" if status in (401, 403) else message
        cause = {"upstream_url": url, "upstream_status": status, "upstream_message": shown}
        if status < 400:
            return UpstreamError(
                f"The upstream engine answered with a redirect ({status}); redirects are not followed", detail=cause
            )
        if status in (401, 403):
            return UpstreamError(
                f"The upstream engine refused this gateway's credentials ({status}); see the server log", detail=cause
            )
        return UpstreamError(f"The upstream engine answered {status}", detail=cause)
    headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else None
    code = error.get("code") or ("model_not_found" if status == 404 else None)
    param, error_type = error.get("param"), error.get("type")
    return UpstreamRejected(
        status,
        message,
        param=param if isinstance(param, str) else None,
        code=str(code)[:100] if code is not None else None,
        error_type=error_type if isinstance(error_type, str) else None,
        headers=headers,
    )


def _error_object(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of an error body (OpenAI's dict, Ollama's string), or the text itself."""
    text = raw.decode("utf-8", errors="replace")
    try:
        error = json.loads(text).get("error", {})
    except (ValueError, AttributeError, RecursionError):
        return {"message": text}
    if not isinstance(error, dict):  # Ollama: {"error": "model 'x' not found"}
        return {"message": str(error)}
    return error


# Lines read between two yields to the event loop: lines already buffered are read without one.
_LINES_PER_YIELD = 256


async def lines_within(response: aiohttp.ClientResponse, max_lines: int) -> AsyncGenerator[bytes, None]:
    """The body's lines, every one counted (blank lines and comments too) against ``max_lines``: past it, the
    upstream is sending more than any answer asked for. Every ``_LINES_PER_YIELD`` lines the event loop gets a
    turn, so that a buffer full of short lines cannot hold it."""
    count = 0
    async for line in response.content:
        count += 1
        if count > max_lines:
            raise UpstreamError("The upstream engine sent more than the tokens asked for")
        if count % _LINES_PER_YIELD == 0:
            await asyncio.sleep(0)
        yield line


def counted_tokens(reported: int, most: int) -> int:
    """Generated tokens as our counters take them: what the upstream reported, at most what the request could
    generate (``most``). The answer still carries the upstream's own count (a reasoning model counts its hidden
    tokens there); only our counters are bounded, so that an upstream cannot inflate them for good."""
    if reported > most:
        log.warning(
            "the upstream reported %d generated tokens, more than the request allows: %d counted", reported, most
        )
        return most
    return reported


def parse_event(data: bytes) -> dict[str, Any]:
    """One JSON event of an upstream stream; anything but a JSON object is the upstream breaking its API."""
    try:
        event = orjson.loads(data)  # once per relayed chunk: ~3x faster than the json module (measured)
    except orjson.JSONDecodeError:
        raise UpstreamError("The upstream engine sent a malformed stream event") from None
    if not isinstance(event, dict):
        raise UpstreamError("The upstream engine sent a malformed stream event")
    return event


@contextlib.contextmanager
def stream_faults() -> Iterator[None]:
    """A stream that goes silent or breaks mid-way (an endless line included), as our errors (504, 502)."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout("The upstream engine stopped sending mid-stream") from None
    except (aiohttp.ClientError, http_exceptions.HttpProcessingError) as exc:
        raise UpstreamError("The upstream stream broke", detail={"cause": repr(exc)}) from None


async def json_within(response: aiohttp.ClientResponse, max_bytes: int) -> Any:
    """A whole JSON answer of at most ``max_bytes``; more, or not JSON, is the upstream breaking its API."""
    parts: list[bytes] = []
    size = 0
    try:
        with stream_faults():
            async for part in response.content.iter_chunked(64 * 1024):
                size += len(part)
                if size > max_bytes:
                    raise UpstreamError(f"The upstream engine sent more than {max_bytes} bytes")
                parts.append(part)
    finally:
        response.close()
    try:
        return orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        raise UpstreamError("The upstream engine sent an answer that is not JSON") from None


def error_message(error: Any) -> str:
    """The message of an error object (OpenAI's dict) or string (Ollama's), cut to a length a client is shown."""
    message = error.get("message", "") if isinstance(error, dict) else error
    return str(message)[:_MESSAGE_LIMIT]
