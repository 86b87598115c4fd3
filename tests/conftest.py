"""Shared fixtures: the real server on the real bundled model, built as a user's process would, and the scripted
upstream several modules relay to. Only fixtures live here; what they are built from is in ``tests/harness``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import onnxruntime_genai as og
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from genai_server.app import create_app
from genai_server.settings import BUNDLED_MODEL
from tests.harness.in_process import ClientFactory, make_settings
from tests.harness.openai_spec import schema_validator
from tests.harness.upstream import ScriptedUpstream


@pytest.fixture
async def make_client(aiohttp_client: Any) -> ClientFactory:
    """Start the real app (model loaded in its cleanup_ctx) with some settings; return a client."""

    async def factory(**overrides: Any) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(make_settings(**overrides)))
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    """A client of the server on the bundled model with default settings."""
    return await make_client()


@pytest.fixture
async def base_url(aiohttp_server: Any) -> str:
    """The OpenAI base URL (``…/v1``) of the server on the bundled model with default settings, for the clients
    that take one (the ``openai`` SDK, LangChain)."""
    server: TestServer = await aiohttp_server(create_app(make_settings()))
    return str(server.make_url("/v1"))


@pytest.fixture
async def oai(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official ``openai`` client of that server."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The model's own tokenizer, to compute the token counts a client should see."""
    return og.Tokenizer(og.Model(str(BUNDLED_MODEL)))


@pytest.fixture(scope="session")
def openai_schema() -> Callable[[str, Any], None]:
    """Validate a payload against a schema of the official OpenAI API description."""
    return schema_validator()


@pytest.fixture
async def scripted(aiohttp_server: Any) -> AsyncIterator[tuple[str, ScriptedUpstream]]:
    """An upstream in the test's process that answers each model name with its script (``ENGINE_SCRIPTS``: the
    shapes engines send, their faults, 'slow' that never answers, 'endless' that never ends); yields its URL and
    the upstream, which records the bodies it was sent and counts the clients that left."""
    upstream = ScriptedUpstream()
    server: TestServer = await aiohttp_server(upstream.app())
    yield str(server.make_url("")).rstrip("/"), upstream
