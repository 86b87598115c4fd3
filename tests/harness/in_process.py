"""The app in the test's own process: its settings, and the type of the ``make_client`` fixture that starts it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from genai_server.settings import Settings

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_settings(**overrides: Any) -> Settings:
    """Settings as the server would read them, but from explicit values only (no env, no .env)."""
    values: dict[str, Any] = {"log_level": "INFO", "log_format": "text", "cors_origins": "*"}
    values.update(overrides)
    return Settings(_env_file=None, **values)
