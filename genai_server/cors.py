"""CORS through aiohttp-cors, on every route; preflight handled by the library."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

# Browsers hide response headers from scripts unless they are exposed.
_EXPOSED = ("X-Request-Id", "Retry-After")


def setup_cors(app: web.Application, origins: list[str]) -> None:
    """Allow ``origins`` (``*`` = any) on every route registered so far, error responses included."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False, expose_headers=_EXPOSED, allow_headers="*", allow_methods="*")
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
