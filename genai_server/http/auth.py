"""API keys: ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as Anthropic's clients send it) on every route
the endpoint table does not call public (health, the OpenAPI document, and metrics unless METRICS_REQUIRE_KEY); an
unknown route needs a key too.

Keys come from API_KEYS and API_KEYS_FILE; none configured means the server is open. Each presented key is
compared with every configured one in constant time, so neither a match's position nor a prefix leaks
through timing, and keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from genai_server.errors import Forbidden, InvalidApiKey
from genai_server.http.endpoints import endpoint_of, public
from genai_server.http.request_state import KEY_OWNER

_X_API_KEY = "x-api-key"


def setup_api_keys(app: web.Application, keys: list[str], admin_keys: list[str] | None = None) -> None:
    """Add the middleware that requires one of ``keys`` (no-op when there are none), and one of ``admin_keys`` on
    the routes that change what the server holds (loading and unloading models) when any are set."""
    if not keys:
        return
    encoded = [key.encode() for key in keys]
    admins = [key.encode() for key in admin_keys or []]

    @web.middleware
    async def api_keys(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # CORS preflights carry no credentials by design; aiohttp-cors answers them.
        if public(request) or request.method == hdrs.METH_OPTIONS:
            return await handler(request)
        presented = _presented(request.headers.get(hdrs.AUTHORIZATION, ""), request.headers.get(_X_API_KEY, ""))
        if presented is None or not _valid(presented, encoded):
            raise InvalidApiKey(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                headers={"WWW-Authenticate": "Bearer"},
            )
        endpoint = endpoint_of(request)
        if admins and endpoint is not None and endpoint.admin and not _valid(presented, admins):
            raise Forbidden("This route needs an admin key (ADMIN_API_KEYS)")
        # Whose caches its generations may continue: a fingerprint, never the key itself.
        request[KEY_OWNER] = hashlib.sha256(presented).hexdigest()
        return await handler(request)

    app.middlewares.append(api_keys)


def _presented(authorization: str, x_api_key: str) -> bytes | None:
    """The key an ``Authorization: Bearer <key>`` header presents, else an ``x-api-key`` header, as bytes; None if
    neither presents one. Header bytes that are not UTF-8 arrive as surrogate escapes: encoded as they are (they
    match no key), never a 500."""
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        presented = x_api_key
    if not presented.strip():
        return None
    return presented.strip().encode("utf-8", "surrogatepass")


def _valid(candidate: bytes, keys: list[bytes]) -> bool:
    matched = False
    for key in keys:  # every key, whatever matched: the time taken does not depend on which one
        matched |= hmac.compare_digest(candidate, key)
    return matched
