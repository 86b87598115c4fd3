"""Typed application state that several modules share, declared in one place. A key that one module alone writes
and reads is declared beside it (``ROUTE_ENDPOINTS`` in endpoints.py, ``OPENAPI_DOCUMENT`` in openapi.py, ``STATE``
in lifecycle.py); the per-request state is in ``request_state.py``."""

from __future__ import annotations

from aiohttp import web
from opentelemetry.trace import Tracer

from genai_server.apis.response_store import ResponseStore
from genai_server.http.concurrency import ConcurrencyLimiter
from genai_server.serving import Serving
from genai_server.settings import Settings
from genai_server.telemetry.gpu import GpuMonitor
from genai_server.telemetry.prometheus import ServerMetrics

SETTINGS = web.AppKey("settings", Settings)
SERVING = web.AppKey("serving", Serving)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
# The routes that only tokenize: as many at once as the engine's tokenizer threads, the same queue bounds.
TOKENIZING_LIMITER = web.AppKey("tokenizing_limiter", ConcurrencyLimiter)
GPU = web.AppKey("gpu", GpuMonitor)
METRICS = web.AppKey("metrics", ServerMetrics)
TRACER = web.AppKey("tracer", Tracer)  # only while tracing is on
RESPONSE_STORE = web.AppKey("response_store", ResponseStore)
