"""A replica that fails a request before its first token reached the client is replaced once by another, on both
relaying backends (scripted replicas; the fleet of real processes is in test_replicas.py): the client gets its
whole answer, streamed or not, and the failure is counted against the replica that broke."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness.in_process import ClientFactory
from tests.harness.responses import metric_sample, stream_chunks
from tests.harness.upstream import OLLAMA_CHAT, USAGE, chunk, dropped, ndjson, sse

MODEL = "replicated"


class Dialect:
    """How a backend's engine answers: where, in what format, and how it fails in-band before any token."""

    def __init__(self, base: str, chat: str, probe: str, content_type: str, answer: bytes, error: bytes) -> None:
        self.base, self.chat_path, self.probe_path = base, base + chat, base + probe
        self.content_type, self.answer, self.error = content_type, answer, error


DIALECTS = {
    "openai": Dialect(
        "/v1",
        "/chat/completions",
        "/models",
        "text/event-stream",
        sse(chunk("Hi"), chunk(" there!", "stop"), USAGE),
        sse({"error": {"message": "out of memory"}}),
    ),
    "ollama": Dialect(
        "", "/api/chat", "/api/version", "application/x-ndjson", OLLAMA_CHAT, ndjson({"error": "out of memory"})
    ),
}
Reply = Callable[[web.Request, Dialect], Awaitable[web.StreamResponse]]


async def _answer(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    return web.Response(body=dialect.answer, content_type=dialect.content_type)


async def _error_event(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    return web.Response(body=dialect.error, content_type=dialect.content_type)


async def _dropped(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    """A 200 and its headers, then the connection is gone (a replica killed mid-request)."""
    return await dropped(request, dialect.content_type)


async def _replica(aiohttp_server: Any, dialect: Dialect, reply: Reply, served: list[int]) -> str:
    async def chat(request: web.Request) -> web.StreamResponse:
        served.append(1)
        return await reply(request, dialect)

    async def probe(request: web.Request) -> web.Response:  # both replicas pass their health probe
        return web.json_response({"object": "list", "data": [], "version": "0.5.0"})

    app = web.Application()
    app.router.add_post(dialect.chat_path, chat)
    app.router.add_get(dialect.probe_path, probe)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url(dialect.base)).rstrip("/")


@pytest.mark.parametrize("fault", [_error_event, _dropped], ids=["error-event", "dropped"])
@pytest.mark.parametrize("backend", sorted(DIALECTS))
async def test_a_replica_that_fails_before_the_first_token_is_replaced(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path, backend: str, fault: Reply
) -> None:
    dialect = DIALECTS[backend]
    good_served: list[int] = []
    broken_served: list[int] = []
    broken = await _replica(aiohttp_server, dialect, fault, broken_served)
    good = await _replica(aiohttp_server, dialect, _answer, good_served)
    models = tmp_path / "models.toml"
    # Round robin: the broken replica is certain to be picked (least in flight would break ties at random).
    models.write_text(
        f'[[models]]\nid = "{MODEL}"\nbackend = "{backend}"\nupstream_model = "up"\nbalance = "round_robin"\n'
        f'urls = ["{broken}", "{good}"]\n'
    )
    client = await make_client(models_file=models)
    for stream in (False, True) * 3:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": stream}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
        if stream:
            chunks = stream_chunks(await resp.text())
            assert "error" not in chunks[-1]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hi there!"
        else:
            assert (await resp.json())["choices"][0]["message"]["content"] == "Hi there!"
    assert len(good_served) == 6
    assert len(broken_served) >= 3  # every other request at least, by round robin
    metrics = await (await client.get("/metrics")).text()
    errors = metric_sample(metrics, "genai_server_upstream_replica_errors_total", model=MODEL, replica=broken)
    assert errors == len(broken_served)
