"""API keys: ``Authorization: Bearer <key>`` on every route the endpoint table does not call public (health, the
OpenAPI document, and metrics unless METRICS_REQUIRE_KEY); an unknown route needs a key too.

Keys come from API_KEYS and API_KEYS_FILE; none configured means the server is open. Each presented key is
compared with every configured one in constant time, so neither a match's position nor a prefix leaks
through timing, and keys are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from genai_server.errors import InvalidApiKey
from genai_server.http.endpoints import public


def setup_api_keys(app: web.Application, keys: list[str]) -> None:
    """Add the middleware that requires one of ``keys`` (no-op when there are none)."""
    if not keys:
        return
    encoded = [key.encode() for key in keys]

    @web.middleware
    async def api_keys(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # CORS preflights carry no credentials by design; aiohttp-cors answers them.
        if public(request) or request.method == hdrs.METH_OPTIONS:
            return await handler(request)
        if not _valid(request.headers.get(hdrs.AUTHORIZATION, ""), encoded):
            raise InvalidApiKey(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    app.middlewares.append(api_keys)


def _valid(header: str, keys: list[bytes]) -> bool:
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    # Header bytes that are not UTF-8 arrive as surrogate escapes: encoded as they are (they match no key),
    # never a 500.
    candidate = presented.strip().encode("utf-8", "surrogatepass")
    matched = False
    for key in keys:  # every key, whatever matched: the time taken does not depend on which one
        matched |= hmac.compare_digest(candidate, key)
    return matched
