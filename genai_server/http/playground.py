"""The playground at ``/``: one page and its script and style, served from the package (nothing fetched from
anywhere else), under a Content-Security-Policy that allows only them and this server's API; and ``GET /load``, the
gauges it shows, as JSON."""

from __future__ import annotations

from dataclasses import asdict
from importlib import resources

from aiohttp import web

from genai_server.errors import NotFound
from genai_server.http.app_keys import METRICS

# The page's files and their types: only these are served (no path from the client reaches the file system).
_ASSETS = {
    "index.html": "text/html",
    "playground.js": "text/javascript",
    "playground.css": "text/css",
}
# Scripts and styles from this server only (no inline script, no eval), requests to this server only, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: web.Request) -> web.Response:
    """``GET /``: the playground."""
    return _asset("index.html")


async def asset(request: web.Request) -> web.Response:
    """``GET /ui/{name}``: the page's script and style."""
    name = request.match_info["name"]
    if name not in _ASSETS or name == "index.html":
        raise NotFound(f"No such file: {name[:64]!r}")
    return _asset(name)


async def load(request: web.Request) -> web.Response:
    """``GET /load``: the gauges Prometheus reads (requests running and waiting, each model's KV-cache use), as
    JSON for a page to poll."""
    return web.json_response(asdict(request.app[METRICS].gauges()))


def _asset(name: str) -> web.Response:
    body = resources.files("genai_server").joinpath("ui", name).read_bytes()
    return web.Response(body=body, content_type=_ASSETS[name], headers=_HEADERS)
