"""The aiohttp application: routes, middleware chain and the engine's lifetime."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from genai_server.app_keys import ENGINE, LIMITER, SERVING, SETTINGS
from genai_server.concurrency import ConcurrencyLimiter, setup_concurrency_limit
from genai_server.cors import setup_cors
from genai_server.engine import EngineConfig, OnnxEngine
from genai_server.error_mapping import setup_error_mapping
from genai_server.request_log import setup_request_log
from genai_server.routes import add_routes
from genai_server.serving import Serving
from genai_server.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """Build the app; no I/O here: the model is loaded when the app starts (``engine_context``)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[LIMITER] = ConcurrencyLimiter(settings.max_concurrent_requests)
    # The order is written once, outermost first:
    # 1. request log: sees every request and the final status, after errors were mapped;
    # 2. error mapping: turns every exception below it, 429 included, into the OpenAI envelope;
    # 3. concurrency limit: innermost, so only real generation requests hold a slot.
    setup_request_log(app)
    setup_error_mapping(app)
    setup_concurrency_limit(app, app[LIMITER])
    add_routes(app)
    setup_cors(app, settings.cors_origins)  # after the routes: it wraps each one
    app.cleanup_ctx.append(engine_context)
    return app


async def engine_context(app: web.Application) -> AsyncIterator[None]:
    """Load the model once before serving; release it after the server stopped."""
    settings = app[SETTINGS]
    path = settings.resolved_model_path
    if settings.uses_bundled_model:
        log.warning("MODEL_PATH is not set: serving the bundled demo model %s, which has random weights "
                    "and produces noise", path.name)
    started = time.perf_counter()
    engine = OnnxEngine(path, EngineConfig(settings.engine_max_batch_size, settings.engine_lanes,
                                           settings.engine_batch_wait_ms, settings.max_model_len))
    await engine.start()
    log.info("model loaded", extra={"fields": {"model_path": str(path), "model": settings.resolved_model_id,
                                                "load_time_ms": round((time.perf_counter() - started) * 1000, 1),
                                                "context_length": engine.context_length}})
    app[ENGINE] = engine
    app[SERVING] = Serving(engine, settings.resolved_model_id, created=int(time.time()))
    yield
    await engine.close()
