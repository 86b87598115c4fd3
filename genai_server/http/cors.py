"""CORS through aiohttp-cors, on every route; preflight handled by the library."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp_cors
from aiohttp import hdrs, web

# Browsers hide response headers from scripts unless they are exposed: a page reads the request id, the 429 advice,
# the rate-limit headers and the timing headers of a whole answer (a stream's figures are in its last chunk).
_EXPOSED = (
    "X-Request-Id",
    "Retry-After",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-total-time",
    "x-time-to-first-token",
    "x-prompt-tokens",
    "x-cached-prompt-tokens",
    "x-generated-tokens",
)


def setup_cors(app: web.Application, origins: list[str]) -> None:
    """Allow ``origins`` (``*`` = any) on every route registered so far, error responses included."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False, expose_headers=_EXPOSED, allow_headers="*", allow_methods="*"
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
    app.on_response_prepare.append(_cors_for_unrouted_errors(frozenset(origins)))


def _cors_for_unrouted_errors(origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """aiohttp-cors only knows routes, so a 404/405 for an unknown route or method would reach a
    browser as an opaque CORS failure; give those error responses the same allow-origin."""

    async def allow(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or request.match_info.route.resource is not None:
            return  # no CORS request, or a routed one that aiohttp-cors handled
        if "*" in origins or origin in origins:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if "*" in origins else origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ",".join(_EXPOSED)

    return allow
