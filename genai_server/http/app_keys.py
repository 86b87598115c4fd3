"""Typed application state, declared in one place (the per-request state: ``request_state.py``)."""

from __future__ import annotations

from aiohttp import web
from opentelemetry.trace import Tracer

from genai_server.embedded.engine import OnnxEngine
from genai_server.http.concurrency import ConcurrencyLimiter
from genai_server.serving import Serving
from genai_server.settings import Settings
from genai_server.telemetry.gpu import GpuMonitor
from genai_server.telemetry.prometheus import ServerMetrics

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", OnnxEngine)  # the first embedded engine
SERVING = web.AppKey("serving", Serving)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
GPU = web.AppKey("gpu", GpuMonitor)
METRICS = web.AppKey("metrics", ServerMetrics)
TRACER = web.AppKey("tracer", Tracer)  # only while tracing is on
