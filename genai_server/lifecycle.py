"""Liveness, readiness and graceful shutdown.

The port opens only once every model is loaded, so a probe during loading finds nothing listening (not
ready). On SIGTERM/SIGINT aiohttp stops listening and runs ``on_shutdown``: the server turns not-ready,
lets in-flight and queued requests finish for up to SHUTDOWN_TIMEOUT seconds, then stops the engines and
upstream connections, which ends the remaining streams with an error event and ``[DONE]``; the process then
releases everything and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from genai_server.app_keys import ENGINES, LIMITER, SERVING, UPSTREAM_SESSION

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class ServerState:
    """Whether the server is draining for shutdown."""

    draining: bool = False


STATE = web.AppKey("state", ServerState)


async def live(request: web.Request) -> web.Response:
    """``GET /health/live``: the process answers (restart it if not)."""
    return web.json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    """``GET /health/ready``: 200 while serving, 503 while draining (send no new work)."""
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready", "models": [m.id for m in request.app[SERVING].list_models().data]})


def setup_lifecycle(app: web.Application, shutdown_timeout_s: float) -> None:
    """Add the probe routes and the drain that runs when the server is told to stop."""
    app[STATE] = ServerState()
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)

    async def drain(app: web.Application) -> None:
        app[STATE].draining = True
        limiter = app[LIMITER]
        waited = 0.0
        while (limiter.in_flight or limiter.queued) and waited < shutdown_timeout_s:
            await asyncio.sleep(_POLL_S)
            waited += _POLL_S
        if limiter.in_flight or limiter.queued:
            log.warning("shutdown timeout: ending %d requests still running or queued",
                        limiter.in_flight + limiter.queued)
        # Ends what is left: engine streams get an error event, relayed streams lose their upstream.
        for engine in app.get(ENGINES, []):
            await engine.close()
        if UPSTREAM_SESSION in app:
            await app[UPSTREAM_SESSION].close()
        while limiter.in_flight or limiter.queued:  # their handlers write the error event and return
            await asyncio.sleep(_POLL_S)

    app.on_shutdown.append(drain)
