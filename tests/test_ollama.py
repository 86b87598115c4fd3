"""BACKEND=ollama: Ollama's native NDJSON API behind the same OpenAI responses (a scripted Ollama)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness.in_process import ClientFactory
from tests.harness.responses import stream_chunks
from tests.harness.upstream import OLLAMA_CHAT, OLLAMA_DURATIONS, ndjson

GENERATE = ndjson(
    {"model": "q", "response": "Once", "done": False},
    {"model": "q", "response": " more", "done": False},
    {"model": "q", "response": "", "done": True, "done_reason": "stop", **OLLAMA_DURATIONS},
)
BROKEN = ndjson(
    {"model": "q", "message": {"role": "assistant", "content": "Hi"}, "done": False}, {"error": "out of memory"}
)
# Lines whose fields have the wrong types, and a stream that never ends: Ollama breaking its API.
MALFORMED = {
    "content-not-text": ndjson({"model": "q", "message": {"role": "assistant", "content": 5}, "done": False}),
    "counts-not-ints": ndjson({"model": "q", "message": {"content": "!"}, "done": True, "prompt_eval_count": "7"}),
    "done-not-bool": ndjson({"model": "q", "response": "x", "done": "yes"}),
    "endless": ndjson(*[{"model": "q", "message": {"content": "x"}, "done": False}] * 200),
}


@pytest.fixture
async def ollama(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        if body["model"] == "missing":
            return web.json_response({"error": "model 'missing' not found"}, status=404)
        script = MALFORMED.get(body["model"]) or (BROKEN if body["model"] == "broken" else OLLAMA_CHAT)
        return web.Response(body=script, content_type="application/x-ndjson")

    async def generate(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(body=GENERATE, content_type="application/x-ndjson")

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    server: TestServer = await aiohttp_server(app)
    yield str(server.make_url("")).rstrip("/"), bodies


async def _client(make_client: ClientFactory, url: str, upstream_model: str = "qwen2.5:0.5b") -> Any:
    return await make_client(backend="ollama", upstream_url=url, model_id="local-qwen", upstream_model=upstream_model)


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "local-qwen",
        "messages": [{"role": "developer", "content": "Be kind"}, {"role": "user", "content": "Hello"}],
        "max_tokens": 3,
        "temperature": 0.5,
        **extra,
    }


async def test_chat_is_translated_both_ways(
    make_client: ClientFactory, ollama: tuple[str, list[Any]], openai_schema: Any
) -> None:
    url, bodies = ollama
    client = await _client(make_client, url)
    body = await (await client.post("/v1/chat/completions", json=_chat(stop="END", seed=4))).json()
    openai_schema("CreateChatCompletionResponse", body)
    assert body["model"] == "local-qwen"
    assert body["choices"][0]["message"]["content"] == "Hi there!"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert body["metrics"]["backend_reported"] == OLLAMA_DURATIONS
    assert body["metrics"]["completion_tokens"] == 3
    sent = bodies[0]
    assert sent["model"] == "qwen2.5:0.5b"
    assert sent["messages"][0] == {"role": "system", "content": "Be kind"}
    assert sent["options"] == {"temperature": 0.5, "num_predict": 3, "seed": 4, "stop": ["END"]}


async def test_chat_stream_is_an_openai_stream(
    make_client: ClientFactory, ollama: tuple[str, list[Any]], openai_schema: Any
) -> None:
    url, _ = ollama
    client = await _client(make_client, url)
    resp = await client.post("/v1/chat/completions", json=_chat(stream=True, stream_options={"include_usage": True}))
    chunks = stream_chunks(await resp.text())
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hi there!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["metrics"]["backend_reported"]["eval_count"] == 3


async def test_completions_use_generate_raw(make_client: ClientFactory, ollama: tuple[str, list[Any]]) -> None:
    url, bodies = ollama
    client = await _client(make_client, url)
    resp = await client.post("/v1/completions", json={"model": "local-qwen", "prompt": "Tell", "stream": True})
    chunks = stream_chunks(await resp.text())
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Once more"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert bodies[0]["raw"] is True and bodies[0]["prompt"] == "Tell"


async def test_ollama_errors_and_limits(make_client: ClientFactory, ollama: tuple[str, list[Any]]) -> None:
    url, _ = ollama
    missing = await _client(make_client, url, upstream_model="missing")
    resp = await missing.post("/v1/chat/completions", json=_chat())
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert (error["code"], error["message"]) == ("model_not_found", "model 'missing' not found")

    client = await _client(make_client, url)
    resp = await client.post("/v1/chat/completions", json=_chat(n=2))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "n"
    for extra in ({"response_format": {"type": "json_object"}}, {"tools": [{"type": "function"}]}):
        resp = await client.post("/v1/chat/completions", json=_chat(**extra))
        assert resp.status == 400  # refused, never silently dropped
        assert (await resp.json())["error"]["code"] == "unsupported_parameter"

    broken = await _client(make_client, url, upstream_model="broken")
    resp = await broken.post("/v1/chat/completions", json=_chat(stream=True))
    events = (await resp.text()).strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert "out of memory" in json.loads(events[-2][len("data: ") :])["error"]["message"]


@pytest.mark.parametrize("script", sorted(MALFORMED))
async def test_lines_of_the_wrong_shape_are_a_502(
    make_client: ClientFactory, ollama: tuple[str, list[Any]], script: str
) -> None:
    """Wrong types in a line (or more lines than the 3 tokens asked for) are Ollama breaking its API: a 502 in the
    envelope, never a 500 or an answer built from whatever arrived."""
    url, _ = ollama
    client = await _client(make_client, url, upstream_model=script)
    resp = await client.post("/v1/chat/completions", json=_chat())
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_error"
