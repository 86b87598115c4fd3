"""The official ``openai`` Python client as the client: it must parse everything the server sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from genai_server.app import create_app
from tests.harness.bodies import LONG_PROMPT, MODEL_ID
from tests.harness.in_process import make_settings

MESSAGES: Any = [{"role": "user", "content": "Hello"}]


async def _client(aiohttp_server: Any, **settings: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    server: TestServer = await aiohttp_server(create_app(make_settings(**settings)))
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def oai(aiohttp_server: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    async for client in _client(aiohttp_server):
        yield client


async def test_models(oai: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in oai.models.list()]
    assert models == [MODEL_ID]
    assert (await oai.models.retrieve(MODEL_ID)).id == MODEL_ID


async def test_chat(oai: openai.AsyncOpenAI) -> None:
    result = await oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message.role == "assistant"
    assert result.usage is not None and result.usage.completion_tokens == 6


async def test_chat_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = await oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


async def test_completions_streamed_and_not(oai: openai.AsyncOpenAI) -> None:
    result = await oai.completions.create(model=MODEL_ID, prompt="Once", max_tokens=5, temperature=0)
    assert result.usage is not None and result.usage.completion_tokens == 5
    stream = await oai.completions.create(model=MODEL_ID, prompt="Once", max_tokens=5, temperature=0, stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream])
    assert text == result.choices[0].text


async def test_errors_map_to_the_client_exception_classes(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=5)
    assert bad.value.code == "invalid_parameter"
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        await oai.chat.completions.create(model="gpt-nothing", messages=MESSAGES)
    assert missing.value.code == "model_not_found"


async def test_rate_limit_is_a_rate_limit_error(aiohttp_server: Any) -> None:
    async for oai in _client(aiohttp_server, max_concurrent_requests=1, max_queued_requests=0):
        long: Any = [{"role": "user", "content": LONG_PROMPT}]
        stream = await oai.chat.completions.create(
            model=MODEL_ID, messages=long, max_tokens=1500, temperature=0, stream=True
        )
        first = await stream.__anext__()  # the stream holds the only slot
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as limited:
            await oai.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
        assert limited.value.code == "rate_limit_exceeded"
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        await stream.close()
