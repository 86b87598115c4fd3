"""Liveness, readiness, graceful shutdown, and stopping when the server can no longer serve.

The port opens only once every model is loaded, so a probe during loading finds nothing listening (not
ready). On SIGTERM/SIGINT aiohttp stops listening and runs ``on_shutdown``: the server turns not-ready and
refuses new generations (503 ``shutting_down``), lets in-flight and queued requests finish for up to
SHUTDOWN_TIMEOUT seconds, then turns the queue away and asks the serving layer to stop, which ends the
remaining streams with an error event and ``[DONE]``. Every wait is bounded, so the process exits within
SHUTDOWN_TIMEOUT plus a few seconds whatever its clients or upstreams do.

If an engine dies (its owner thread failed), the server cannot generate any more: health and readiness turn
503, what was in flight gets an error, and the process stops with ``ExitStatus.ENGINE_FAILED`` so that
systemd or Kubernetes restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from genai_server.http.app_keys import LIMITER, SERVING

log = logging.getLogger(__name__)

_POLL_S = 0.05
# After SHUTDOWN_TIMEOUT and the stop, how long handlers get to write their error event and return.
STOP_MARGIN_S = 3.0


@dataclass
class ServerState:
    """Whether the server is draining for shutdown, or has failed and must be restarted."""

    draining: bool = False
    failure: str | None = None
    # Whether the process ever listened (``announce_listening``): a server that never did has nothing to drain to
    # report, e.g. when its port was taken.
    listening: bool = False
    # How to end the process once it has failed; ``__main__`` sets it (an embedding test leaves it unset).
    stop_process: Callable[[], None] | None = None
    stopping: bool = False  # a stop signal came: a second one stops the process at once


STATE = web.AppKey("state", ServerState)


def server_failed(app: web.Application, reason: str) -> None:
    """The server can no longer serve (an engine died): fail the probes and stop the process."""
    state = app[STATE]
    if state.failure is not None:
        return
    state.failure = reason
    log.critical("the server cannot serve any more and stops: %s", reason, extra={"fields": {"code": "engine_failed"}})
    if state.stop_process is not None and not state.stopping:  # already draining: it will exit with our status
        state.stop_process()


def _failed(request: web.Request) -> web.Response | None:
    failure = request.app[STATE].failure
    if failure is None:
        return None
    return web.json_response({"status": "failed", "reason": "an engine failed; the server is restarting"}, status=503)


async def health(request: web.Request) -> web.Response:
    """``GET /health``: the model is loaded (the port only opens after it is) and its engine alive."""
    failed = _failed(request)  # a response is a mapping (falsy when empty): compared with None, never by truth
    return (
        failed
        if failed is not None
        else web.json_response({"status": "ok", "model": request.app[SERVING].default_model})
    )


async def live(request: web.Request) -> web.Response:
    """``GET /health/live``: the process answers and its engines are alive (restart it if not)."""
    failed = _failed(request)
    return failed if failed is not None else web.json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    """``GET /health/ready``: 200 while every model can be served; 503 while draining, after a failure, or while
    an upstream does not answer (send no new work)."""
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    failed = _failed(request)
    if failed is not None:
        return failed
    models = await request.app[SERVING].ready()
    if not all(models.values()):
        unavailable = sorted(model for model, ok in models.items() if not ok)
        return web.json_response({"status": "unavailable", "models": unavailable}, status=503)
    return web.json_response({"status": "ready", "models": list(models)})


def announce_listening(app: web.Application, host: str, port: int) -> None:
    """The line an operator waits for: where the server listens and what it serves."""
    app[STATE].listening = True
    served = ", ".join(f"model {model}, backend {backend}" for model, backend in app[SERVING].backend_names.items())
    log.info("listening on http://%s:%d (%s)", host, port, served)


async def log_stop_signals(app: web.Application) -> None:
    """On start-up of the real process: say which signal stopped it, then stop as aiohttp does (its handlers are
    installed before start-up, so these replace them). A second SIGTERM or SIGINT while the server drains means
    "stop now": the process exits at once with 128 + the signal's number (143, 130), as a shell reports a process
    a signal ended; before, it ended with 143, 130, or now and then 1 and a traceback."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop, app[STATE], sig)


def _stop(state: ServerState, sig: signal.Signals) -> None:
    if state.stopping:
        log.warning("received %s again: stopping now", sig.name, extra={"fields": {"signal": sig.name}})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + sig.value)
    state.stopping = True
    log.info("received %s: stopping", sig.name, extra={"fields": {"signal": sig.name}})
    raise web.GracefulExit()


def setup_lifecycle(app: web.Application, shutdown_timeout_s: float) -> None:
    """Add the server's state (its probes read it) and the drain that runs when the server is told to stop."""
    app[STATE] = ServerState()

    async def drain(app: web.Application) -> None:
        app[STATE].draining = True
        limiter = app[LIMITER]
        limiter.stop_admitting()
        report = log.info if app[STATE].listening else log.debug
        report(
            "draining: %d running, %d queued, waiting up to %g s",
            limiter.in_flight,
            limiter.queued,
            shutdown_timeout_s,
            extra={
                "fields": {
                    "running": limiter.in_flight,
                    "queued": limiter.queued,
                    "shutdown_timeout_s": shutdown_timeout_s,
                }
            },
        )
        finished = await _wait_idle(app, shutdown_timeout_s)
        if not finished:
            log.warning(
                "shutdown timeout: ending %d requests still running or queued", limiter.in_flight + limiter.queued
            )
        limiter.close()  # the queue is told 503 shutting_down
        if SERVING in app:
            await app[SERVING].stop()  # what still runs ends with a shutting_down error event
        if not await _wait_idle(app, STOP_MARGIN_S):
            log.error("%d requests did not end after the stop; their connections are closed", limiter.in_flight)
        outcome = "every request finished" if finished else "requests were cut short"
        report("drained: %s", outcome, extra={"fields": {"all_finished": finished}})

    app.on_shutdown.append(drain)


async def _wait_idle(app: web.Application, timeout_s: float) -> bool:
    """Wait until no generation request runs or waits, at most ``timeout_s``; whether that happened."""
    limiter = app[LIMITER]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while limiter.in_flight or limiter.queued:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True
