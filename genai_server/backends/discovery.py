"""Which models an OpenAI-compatible upstream serves: ``GET /v1/models``, read once at start-up.

``BACKEND=openai UPSTREAM_URL=...`` without ``MODEL_ID`` or ``UPSTREAM_MODEL`` serves every model the upstream
lists, under the upstream's own ids, as vLLM, SGLang and llama-server name them. The listing is upstream bytes
like any other: its size, its shape and the ids in it are bounded and checked, and an upstream that cannot be
listed is a start-up failure (the server must not start half alive), which a supervisor retries.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from genai_server.errors import UpstreamUnavailableAtStart
from genai_server.shown_urls import shown_url, with_path, without_secrets

MAX_LISTING_BYTES = 1024 * 1024
MAX_MODELS = 256
MAX_ID_CHARS = 256


async def upstream_model_ids(url: str, timeout: aiohttp.ClientTimeout, api_key: str | None = None) -> list[str]:
    """The ids the upstream at ``url`` (its ``/v1`` base) lists, in its order; ``UpstreamUnavailableAtStart`` if it
    cannot be listed."""
    headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    listing_url = with_path(url, "/models")
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers, auto_decompress=False) as session,
            session.get(listing_url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise _failed(listing_url, f"it answered HTTP {response.status}")
            body = await response.content.read(MAX_LISTING_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise _failed(listing_url, without_secrets(f"{type(exc).__name__}: {exc}", url)) from None
    if len(body) > MAX_LISTING_BYTES:
        raise _failed(listing_url, f"its listing is larger than {MAX_LISTING_BYTES} bytes")
    return _ids(listing_url, body)


def _ids(listing_url: str, body: bytes) -> list[str]:
    try:
        listing: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _failed(listing_url, "its listing is not JSON") from exc
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise _failed(listing_url, 'its listing has no "data" list of models')
    ids = [item.get("id") for item in data]
    if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS and i.isprintable() for i in ids):
        raise _failed(listing_url, f"a model id is not a printable string of 1 to {MAX_ID_CHARS} characters")
    if not ids:
        raise _failed(listing_url, "it lists no models")
    if len(ids) > MAX_MODELS:
        raise _failed(listing_url, f"it lists {len(ids)} models, more than {MAX_MODELS}")
    return list(dict.fromkeys(ids))  # in order, each once


def _failed(listing_url: str, reason: str) -> UpstreamUnavailableAtStart:
    return UpstreamUnavailableAtStart(
        f"cannot list the upstream's models at {shown_url(listing_url)}: {reason} (or set MODEL_ID / UPSTREAM_MODEL)"
    )
