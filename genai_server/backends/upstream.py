"""What every backend that talks HTTP to an engine elsewhere shares: posting, and turning faults into our errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import aiohttp

from genai_server.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable


async def post_upstream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                        headers: dict[str, str]) -> aiohttp.ClientResponse:
    """POST ``body``; refused -> 502, no answer in time -> 504, an error status -> its ``UpstreamRejected``/502."""
    try:
        response = await session.post(url, json=body, headers=headers)
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(f"The upstream engine at {url} cannot be reached: {exc.os_error}") from None
    except TimeoutError:
        raise UpstreamTimeout(f"The upstream engine at {url} did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The upstream engine failed: {exc}") from None
    if response.status >= 400:
        raise await _rejection(response)
    return response


async def _rejection(response: aiohttp.ClientResponse) -> Exception:
    """The upstream's error answer as ours: its 4xx passed on with its message, its 5xx as a 502."""
    text = await response.text()
    response.close()
    try:
        error = json.loads(text).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):  # Ollama: {"error": "model 'x' not found"}
        error = {"message": str(error)}
    message = error_message(error) or text[:500] or response.reason or "no message"
    if response.status >= 500:
        return UpstreamError(f"The upstream engine answered {response.status}: {message}")
    headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else None
    code = error.get("code") or ("model_not_found" if response.status == 404 else None)
    return UpstreamRejected(response.status, message, param=error.get("param"),
                            code=str(code) if code is not None else None, error_type=error.get("type"),
                            headers=headers)


def parse_event(data: bytes) -> dict[str, Any]:
    """One JSON event of an upstream stream; anything but a JSON object is the upstream breaking its API."""
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamError("The upstream engine sent a malformed stream event") from None
    if not isinstance(event, dict):
        raise UpstreamError("The upstream engine sent a malformed stream event")
    return event


@contextlib.contextmanager
def stream_faults() -> Iterator[None]:
    """A stream that goes silent or breaks mid-way, as our errors (504, 502)."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout("The upstream engine stopped sending mid-stream") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The upstream stream broke: {exc}") from None


def error_message(error: Any) -> str:
    """The message of an error object (OpenAI's dict) or string (Ollama's)."""
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(error)
