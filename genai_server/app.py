"""The aiohttp application: routes, middleware chain and the engine's lifetime."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from genai_server.app_keys import ENGINE, GPU, LIMITER, METRICS, SERVING, SETTINGS
from genai_server.backends import Backend
from genai_server.backends.ollama import OllamaBackend
from genai_server.backends.onnx import OnnxBackend
from genai_server.backends.openai_upstream import OpenAIUpstream
from genai_server.concurrency import ConcurrencyLimiter, setup_concurrency_limit
from genai_server.cors import setup_cors
from genai_server.engine import EngineConfig, OnnxEngine
from genai_server.error_mapping import setup_error_mapping
from genai_server.gpu import GpuMonitor
from genai_server.prometheus import ServerMetrics, setup_prometheus
from genai_server.request_log import setup_request_log
from genai_server.routes import add_routes
from genai_server.serving import Serving
from genai_server.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """Build the app; no I/O here: the backend starts with the app (``backends_context``)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[LIMITER] = ConcurrencyLimiter(settings.max_concurrent_requests)
    app[METRICS] = ServerMetrics(settings.backend, lambda: _gauges(app))
    # The order is written once, outermost first:
    # 1. Prometheus: counts every generation request by its final status, 429s included;
    # 2. request log: sees every request and the final status, after errors were mapped;
    # 3. error mapping: turns every exception below it, 429 included, into the OpenAI envelope;
    # 4. concurrency limit: innermost, so only real generation requests hold a slot.
    setup_prometheus(app, app[METRICS], settings.resolved_model_id)
    setup_request_log(app)
    setup_error_mapping(app)
    setup_concurrency_limit(app, app[LIMITER])
    add_routes(app)
    setup_cors(app, settings.cors_origins)  # after the routes: it wraps each one
    app.cleanup_ctx.append(backends_context)
    return app


async def backends_context(app: web.Application) -> AsyncIterator[None]:
    """Start the configured backend before serving (load the model, or open the upstream session);
    release it after the server stopped."""
    settings = app[SETTINGS]
    gpu = GpuMonitor()
    await gpu.start()
    app[GPU] = gpu
    async with contextlib.AsyncExitStack() as stack:
        if settings.backend == "onnx":
            backend: Backend = await stack.enter_async_context(_onnx_backend(app, settings))
        else:
            backend = await stack.enter_async_context(_upstream_backend(settings))
        app[SERVING] = Serving({settings.resolved_model_id: backend}, gpu)
        yield
    await gpu.stop()


@contextlib.asynccontextmanager
async def _onnx_backend(app: web.Application, settings: Settings) -> AsyncIterator[Backend]:
    """Load the model once; the engine lives until the server stops."""
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
    try:
        yield OnnxBackend(engine, settings.resolved_model_id, created=int(time.time()),
                          always_usage=settings.stream_usage_always)
    finally:
        await engine.close()


@contextlib.asynccontextmanager
async def _upstream_backend(settings: Settings) -> AsyncIterator[Backend]:
    """One shared client session to the upstream for the server's lifetime."""
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout_s,
                                    sock_read=settings.upstream_read_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert settings.upstream_url is not None  # checked by Settings
        api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        log.info("relaying to an upstream engine",
                 extra={"fields": {"backend": settings.backend, "upstream_url": settings.upstream_url,
                                   "model": settings.resolved_model_id,
                                   "upstream_model": settings.resolved_upstream_model}})
        if settings.backend == "ollama":
            yield OllamaBackend(session, settings.upstream_url, settings.resolved_model_id,
                                settings.resolved_upstream_model, always_usage=settings.stream_usage_always)
            return
        yield OpenAIUpstream(session, settings.upstream_url, settings.resolved_model_id,
                             settings.resolved_upstream_model, api_key=api_key,
                             always_usage=settings.stream_usage_always)


def _gauges(app: web.Application) -> tuple[int, int, float | None]:
    """Generation requests in flight, sequences waiting for a batch, GPU memory used: read at scrape time."""
    waiting = app[ENGINE].waiting_sequences() if ENGINE in app else 0
    gpu_used = app[GPU].used_mb() if GPU in app else None
    return app[LIMITER].in_flight, waiting, gpu_used
