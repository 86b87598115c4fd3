"""Typed application and request state, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from genai_server.embedded.engine import OnnxEngine
from genai_server.http.concurrency import ConcurrencyLimiter
from genai_server.serving import Serving
from genai_server.settings import Settings
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.gpu import GpuMonitor

if TYPE_CHECKING:
    from genai_server.telemetry.prometheus import ServerMetrics

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", OnnxEngine)  # the first embedded engine
ENGINES = web.AppKey("engines", dict[str, OnnxEngine])  # every embedded engine, by model id
SERVING = web.AppKey("serving", Serving)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
GPU = web.AppKey("gpu", GpuMonitor)
# Typed by annotation only: prometheus.py needs the request keys below, so importing it here would be circular.
METRICS: web.AppKey[ServerMetrics] = web.AppKey("metrics")

REQUEST_ID = web.RequestKey("request_id", str)
# A generation request's JSON body, read and checked before it takes a slot (request_body.py).
BODY = web.RequestKey("body", dict[str, Any])
# perf_counter() when the request reached the server, before any queueing: where its telemetry starts.
ARRIVAL = web.RequestKey("arrival", float)
REQUEST_STATS = web.RequestKey("request_stats", RequestTelemetry)
# The status a request ended with, as logged (499: the client left); read by the Prometheus middleware.
FINAL_STATUS = web.RequestKey("final_status", int)
