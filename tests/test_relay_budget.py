"""The gateway's retry budget, as a client and the replicas see it: a request is posted at most twice, the second
time to a replica it has not tried; and a limit that does not fit is blamed on the parameter the client sent.

The replicas are scripted: aiohttp apps on loopback ports that record every post they get, by the request's
message (each request says which one it is), so a test can follow one request across the replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from genai_server.app import create_app
from genai_server.settings import Settings

MODEL = "replicated"
Gateway = TestClient[web.Request, web.Application]
Fault = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _unavailable(request: web.Request) -> web.StreamResponse:
    """A post that fails: a 5xx before any byte of an answer."""
    return web.json_response({"error": {"message": "overloaded"}}, status=503)


async def _error_event(request: web.Request) -> web.StreamResponse:
    """A 200 whose stream fails in-band before its first token (an engine out of memory)."""
    body = b'data: {"error": {"message": "out of memory"}}\n\n'
    return web.Response(body=body, content_type="text/event-stream")


async def _dropped(request: web.Request) -> web.StreamResponse:
    """A 200 and its headers, then the connection is gone (a replica killed mid-request)."""
    response = web.StreamResponse()
    response.content_type = "text/event-stream"
    await response.prepare(request)
    assert request.transport is not None
    request.transport.close()
    return response


class Replica:
    """One scripted upstream: answers every post with ``fault`` and remembers which request each post was."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.posts: list[str] = []  # the message of each request posted to it, in order
        self.url = ""

    async def serve(self, aiohttp_server: Any) -> Replica:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)  # every replica passes its health probe
        server: TestServer = await aiohttp_server(app)
        self.url = str(server.make_url("/v1"))
        return self

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.posts.append((await request.json())["messages"][0]["content"])
        return await self.fault(request)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})


async def _gateway(aiohttp_client: Any, tmp_path: Path, replicas: list[Replica], balance: str) -> Gateway:
    urls = ", ".join(f'"{replica.url}"' for replica in replicas)
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nid = "{MODEL}"\nbackend = "openai"\nupstream_model = "up"\nbalance = "{balance}"\n'
        f"urls = [{urls}]\n"
    )
    settings = Settings(_env_file=None, models_file=models, log_format="text")
    client: Gateway = await aiohttp_client(create_app(settings))
    return client


def _sample(exposition: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


@pytest.mark.parametrize("balance", ["round_robin", "least_in_flight"])
async def test_a_request_whose_first_two_replicas_fail_makes_exactly_two_posts(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, balance: str
) -> None:
    """Three replicas that each fail before the first token, each its own way (a failed post, an error event, a
    dropped connection): whichever two a request meets first, it is posted to exactly those two, one after the
    other, never back to the one it left and never on to a third; the client gets the 502."""
    replicas = [await Replica(fault).serve(aiohttp_server) for fault in (_unavailable, _error_event, _dropped)]
    gateway = await _gateway(aiohttp_client, tmp_path, replicas, balance)
    requests = [f"request {i}" for i in range(6)]
    for i, message in enumerate(requests):
        body = {"model": MODEL, "messages": [{"role": "user", "content": message}], "stream": i % 2 == 1}
        resp = await gateway.post("/v1/chat/completions", json=body)
        assert resp.status == 502, await resp.text()  # an error status: nothing had reached the client
        assert (await resp.json())["error"]["type"] == "server_error"

    for message in requests:
        posted_to = [replica for replica in replicas if message in replica.posts]
        assert len(posted_to) == 2, f"{message} went to {len(posted_to)} replicas"
        assert all(replica.posts.count(message) == 1 for replica in posted_to), f"{message} went back to a replica"
    assert sum(len(replica.posts) for replica in replicas) == 2 * len(requests)
    retries = [record for record in caplog.records if record.getMessage() == "retrying on another replica"]
    assert len(retries) == len(requests)  # one per request: the second post, and no third

    exposition = await (await gateway.get("/metrics")).text()
    for replica in replicas:
        labels = {"model": MODEL, "replica": replica.url}
        assert _sample(exposition, "genai_server_upstream_replica_requests_total", **labels) == len(replica.posts)
        assert _sample(exposition, "genai_server_upstream_replica_errors_total", **labels) == len(replica.posts)


async def test_one_replica_gets_one_post(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    """With no other replica to go to, a failed request is not posted again to the one there is."""
    replica = await Replica(_error_event).serve(aiohttp_server)
    gateway = await _gateway(aiohttp_client, tmp_path, [replica], "least_in_flight")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "alone"}]}
    resp = await gateway.post("/v1/chat/completions", json=body)
    assert resp.status == 502
    assert replica.posts == ["alone"]


@pytest.mark.parametrize(
    ("limits", "blamed"),
    [
        ({"max_completion_tokens": 64}, "max_completion_tokens"),
        ({"max_tokens": 64}, "max_tokens"),
        ({"max_tokens": 8, "max_completion_tokens": 64}, "max_completion_tokens"),  # the newer name wins
    ],
)
async def test_a_limit_beyond_the_context_is_blamed_on_the_parameter_sent(
    aiohttp_client: Any, limits: dict[str, int], blamed: str
) -> None:
    """The embedded engine with a 64-token context: a completion limit that fits MAX_TOKENS_LIMIT but not beside the
    prompt is a 400 naming the parameter the client used (``onnx.py`` decides it; ``protocol.py`` names it)."""
    settings = Settings(_env_file=None, max_model_len=64, log_format="text")
    gateway: Gateway = await aiohttp_client(create_app(settings))
    model = (await (await gateway.get("/v1/models")).json())["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **limits}
    resp = await gateway.post("/v1/chat/completions", json=body)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", blamed)


async def test_a_limit_beyond_max_tokens_limit_is_blamed_on_the_parameter_sent(aiohttp_client: Any) -> None:
    """MAX_TOKENS_LIMIT is checked before any backend (``serving.py``), and blames the same parameter."""
    settings = Settings(_env_file=None, max_tokens_limit=16, log_format="text")
    gateway: Gateway = await aiohttp_client(create_app(settings))
    model = (await (await gateway.get("/v1/models")).json())["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 17}
    resp = await gateway.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_completion_tokens"
