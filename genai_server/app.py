"""The aiohttp application: routes, middleware chain and the engine's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from genai_server.apis.response_store import ResponseStore
from genai_server.backends import Backend
from genai_server.backends.discovery import upstream_model_ids
from genai_server.backends.factory import build_backend
from genai_server.backends.model_pool import ModelPool
from genai_server.embedded.engine import TOKENIZER_THREADS
from genai_server.http.app_keys import GPU, LIMITER, METRICS, RESPONSE_STORE, SERVING, SETTINGS, TOKENIZING_LIMITER
from genai_server.http.auth import setup_api_keys
from genai_server.http.concurrency import ConcurrencyLimiter, setup_concurrency_limit
from genai_server.http.cors import setup_cors
from genai_server.http.endpoints import add_endpoints
from genai_server.http.error_mapping import setup_error_mapping
from genai_server.http.first_byte import FirstBytes
from genai_server.http.host_check import setup_host_check
from genai_server.http.lifecycle import server_failed, setup_lifecycle
from genai_server.http.load_report import setup_load_report
from genai_server.http.openapi import setup_openapi
from genai_server.http.request_body import setup_request_body
from genai_server.http.request_record import setup_request_record
from genai_server.http.routes import endpoint_table
from genai_server.http.slo_admission import setup_slo_admission
from genai_server.serving import RequestLimits, Serving
from genai_server.settings import ModelEntry, Settings
from genai_server.shown_urls import shown_url
from genai_server.telemetry.gpu import GpuMonitor
from genai_server.telemetry.load import BackendLoad, ReplicaLoad, Residency
from genai_server.telemetry.prometheus import Gauges, ServerMetrics, Slo
from genai_server.telemetry.tracing import otlp_exporter

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, *, span_exporter: SpanExporter | None = None, first_bytes: FirstBytes | None = None
) -> web.Application:
    """Build the app; no I/O here: the backend starts with the app (``backends_context``). ``span_exporter``
    replaces the OTLP one (tests read spans from memory); ``first_bytes``: the sockets the server listens on, which
    start each request's clock at its first byte (``__main__``; a test's server has none)."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[LIMITER] = ConcurrencyLimiter(
        settings.max_concurrent_requests, settings.max_queued_requests, settings.queue_timeout
    )
    app[TOKENIZING_LIMITER] = ConcurrencyLimiter(
        TOKENIZER_THREADS, settings.max_queued_requests, settings.queue_timeout
    )
    app[RESPONSE_STORE] = ResponseStore(
        settings.responses_store_max_items, int(settings.responses_store_max_mb * 1024 * 1024)
    )
    slo = Slo(settings.slo_ttft_ms, settings.slo_tpot_ms, settings.slo_e2e_ms)
    app[METRICS] = ServerMetrics(lambda: _gauges(app), slo, lambda: _replicas(app), lambda: _residency(app))
    endpoints = endpoint_table(metrics_public=not settings.metrics_require_key, ui=settings.ui)
    # The order is written once, outermost first:
    # 1. request record: sees every request and the status it really ended with, after errors were mapped; hands
    #    one record of it to the access log, Prometheus and the span (which covers everything below);
    # 2. error mapping: turns every exception below it, 401 and 429 included, into the OpenAI envelope;
    # 3. Host: on loopback, a request for another name (DNS rebinding from a web page) is refused before anything;
    # 4. API keys: a request without one is refused before its body is read or it can wait for a slot;
    # 5. request body: read whole and checked before the slot, so a slow sender holds a connection, not a slot;
    # 6. SLO admission: a request that cannot meet its TTFT objective is refused before it waits in line;
    # 7. concurrency limit: innermost, so only real generation requests hold a slot.
    setup_request_record(
        app,
        app[METRICS],
        default_backend=settings.backend,
        span_exporter=_span_exporter(settings, span_exporter),
        first_bytes=first_bytes,
    )
    setup_error_mapping(app)
    setup_host_check(app, settings.server_host, settings.allowed_hosts)
    setup_api_keys(app, settings.all_api_keys, [key.get_secret_value() for key in settings.admin_api_keys])
    setup_request_body(app, settings.request_read_timeout, settings.max_body_bytes)
    setup_slo_admission(app, settings.slo_ttft_ms, refuse=settings.slo_admission)
    setup_concurrency_limit(app, app[LIMITER], app[TOKENIZING_LIMITER])
    add_endpoints(app, endpoints)
    setup_openapi(app, endpoints)
    setup_lifecycle(app, settings.shutdown_timeout)
    setup_load_report(app, lambda: _gauges(app))
    setup_cors(app, settings.cors_origins)  # after the routes: it wraps each one
    app.cleanup_ctx.append(backends_context)
    return app


def _span_exporter(settings: Settings, given: SpanExporter | None) -> SpanExporter | None:
    """Where spans go: the exporter given (tests), else OTLP when an endpoint is set, else nowhere (tracing off)."""
    if given is None and settings.otel_exporter_otlp_endpoint:
        return otlp_exporter(settings.otel_exporter_otlp_endpoint)
    return given


async def backends_context(app: web.Application) -> AsyncIterator[None]:
    """Start every model's backend before serving (load the engines, open the upstream sessions); the serving
    layer owns them from then on and releases them when it stops (the drain, or here after the server stopped)."""
    settings = app[SETTINGS]
    gpu = app[GPU] = GpuMonitor()
    await gpu.start()
    entries = settings.models or await _upstream_entries(settings)
    pool = ModelPool(
        settings.max_loaded_models, settings.model_ttl_s, settings.model_load_timeout_s, settings.models_memory_mb
    )
    backends = {entry.id: _backend(app, settings, entry, pool) for entry in entries}
    limits = RequestLimits(
        max_messages=settings.max_messages,
        max_tokens_limit=settings.max_tokens_limit,
        max_sequences=settings.max_sequences_per_request,
    )
    serving = Serving(backends, gpu, limits)
    try:
        await serving.start()
        app[SERVING] = serving
        yield
    finally:
        await serving.stop()
        await gpu.stop()


async def _upstream_entries(settings: Settings) -> list[ModelEntry]:
    """BACKEND=openai with no model named: one entry per model the upstream lists, under its own id."""
    assert settings.upstream_url is not None  # checked by Settings
    key = settings.upstream_api_key
    ids = await upstream_model_ids(
        settings.upstream_url,
        aiohttp.ClientTimeout(total=settings.upstream_connect_timeout_s + settings.upstream_read_timeout_s),
        key.get_secret_value() if key else None,
    )
    shown = shown_url(settings.upstream_url)
    log.info("serving the upstream's models", extra={"fields": {"upstream_url": shown, "models": ids}})
    native = settings.upstream_native_apis
    return [ModelEntry(id=i, backend="openai", url=settings.upstream_url, api_key=key, native_apis=native) for i in ids]


def _backend(app: web.Application, settings: Settings, entry: ModelEntry, pool: ModelPool) -> Backend:
    """The backend serving one model, not yet started; if an embedded engine loaded at start-up ever dies, the
    server stops with an error (one loaded on demand, into ``pool``, fails alone)."""

    def engine_failed(exc: BaseException) -> None:
        server_failed(app, f"the {entry.id} engine failed: {exc!r}")

    return build_backend(entry, settings, on_engine_failure=engine_failed, pool=pool)


def _loads(app: web.Application) -> dict[str, BackendLoad]:
    """Per model, its backend's load as it reports it (none before the backends start)."""
    backends = app[SERVING].backends.items() if SERVING in app else ()
    return {model: backend.load() for model, backend in backends}


def _gauges(app: web.Application) -> Gauges:
    """Generation requests in flight, sequences waiting, KV-cache use, GPU memory used: read at scrape time."""
    loads = _loads(app)
    kv_cache_usage = {model: load.kv_cache_usage for model, load in loads.items() if load.kv_cache_usage is not None}
    return Gauges(
        running=app[LIMITER].in_flight,
        # vLLM's meaning, work accepted and not yet running: requests queued for a slot, and sequences a
        # backend has not yet started.
        waiting=app[LIMITER].queued + sum(load.waiting for load in loads.values()),
        kv_cache_usage=kv_cache_usage,
        gpu_used_mb=app[GPU].used_mb() if GPU in app else None,
    )


def _residency(app: web.Application) -> dict[str, Residency]:
    """Per model loaded on demand (MODELS_DIR), whether it is in memory and its loads and unloads."""
    return {model: load.residency for model, load in _loads(app).items() if load.residency is not None}


def _replicas(app: web.Application) -> dict[str, tuple[ReplicaLoad, ...]]:
    """Per model, the upstream replicas its backend relays to (none for an embedded engine)."""
    return {model: load.replicas for model, load in _loads(app).items() if load.replicas}
