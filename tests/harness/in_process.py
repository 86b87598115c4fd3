"""The app in the test's own process: its settings, the type of the ``make_client`` fixture that starts it, and the
embedded engine a test watches or breaks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from genai_server.backends.onnx import OnnxBackend
from genai_server.embedded.engine import EmbeddedEngine
from genai_server.http.app_keys import SERVING
from genai_server.settings import Settings

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_settings(**overrides: Any) -> Settings:
    """Settings as the server would read them, but from explicit values only (no env, no .env)."""
    values: dict[str, Any] = {"log_level": "INFO", "log_format": "text", "cors_origins": "*"}
    values.update(overrides)
    return Settings(_env_file=None, **values)


def embedded_engine(app: web.Application) -> EmbeddedEngine:
    """The engine of the app's first model, which a test expects to be served by the embedded backend."""
    backend = next(iter(app[SERVING].backends.values()))
    assert isinstance(backend, OnnxBackend), backend
    return backend.engine


async def replicated_gateway(
    make_client: ClientFactory, folder: Path, model: str, urls: list[str], balance: str, more: str = ""
) -> TestClient[web.Request, web.Application]:
    """A gateway serving ``model`` from the replicas at ``urls`` (each an upstream's ``/v1``, which knows the model
    as "up"), picked as ``balance`` says, with ``more`` lines of its models-file entry; its models file is written
    into ``folder``."""
    listed = ", ".join(f'"{url}"' for url in urls)
    models = folder / "models.toml"
    models.write_text(
        f'[[models]]\nid = "{model}"\nbackend = "openai"\nupstream_model = "up"\nbalance = "{balance}"\n'
        f"urls = [{listed}]\n{more}"
    )
    return await make_client(models_file=models)
