"""Typed application and request state, declared in one place."""

from __future__ import annotations

from aiohttp import web

from genai_server.concurrency import ConcurrencyLimiter
from genai_server.engine import OnnxEngine
from genai_server.serving import RequestStats, Serving
from genai_server.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", OnnxEngine)
SERVING = web.AppKey("serving", Serving)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_STATS = web.RequestKey("request_stats", RequestStats)
