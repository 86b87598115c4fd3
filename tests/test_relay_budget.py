"""The gateway's retry budget, as a client and the replicas see it: a request is posted at most twice, the second
time to a replica it has not tried.

The replicas are scripted upstreams (``tests/harness/upstream.py``) that record every body posted to them; each
request's message says which request it is, so a test can follow one request across the replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.harness.in_process import ClientFactory, replicated_gateway
from tests.harness.responses import metric_sample
from tests.harness.upstream import Drop, Reply, Script, ScriptedUpstream, sse

MODEL = "replicated"
Gateway = TestClient[web.Request, web.Application]
# Every replica passes its health probe: whatever fails, fails in a request.
LISTING = {"object": "list", "data": []}
# A post that fails: a 5xx before any byte of an answer.
UNAVAILABLE = Reply(b'{"error": {"message": "overloaded"}}', status=503, content_type="application/json")
# A 200 whose stream fails in-band before its first token (an engine out of memory).
ERROR_EVENT = Reply(sse({"error": {"message": "out of memory"}}, done=False))


class Replica:
    """One scripted upstream on a loopback port, answering every post with ``script``."""

    def __init__(self, upstream: ScriptedUpstream, url: str) -> None:
        self.upstream = upstream
        self.url = url

    @property
    def posts(self) -> list[str]:
        """The message of each request posted to it, in order."""
        return [body["messages"][0]["content"] for body in self.upstream.bodies]


async def _replica(aiohttp_server: Any, script: Script) -> Replica:
    upstream = ScriptedUpstream({}, default=script, listing=LISTING)
    server: TestServer = await aiohttp_server(upstream.app())
    return Replica(upstream, str(server.make_url("/v1")))


async def _gateway(make_client: ClientFactory, tmp_path: Path, replicas: list[Replica], balance: str) -> Gateway:
    return await replicated_gateway(make_client, tmp_path, MODEL, [replica.url for replica in replicas], balance)


@pytest.mark.parametrize("balance", ["round_robin", "least_in_flight", "cache_aware"])
async def test_a_request_whose_first_two_replicas_fail_makes_exactly_two_posts(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, balance: str
) -> None:
    """Three replicas that each fail before the first token, each its own way (a failed post, an error event, a
    dropped connection): whichever two a request meets first, it is posted to exactly those two, one after the
    other, never back to the one it left and never on to a third; the client gets the 502."""
    replicas = [await _replica(aiohttp_server, script) for script in (UNAVAILABLE, ERROR_EVENT, Drop())]
    gateway = await _gateway(make_client, tmp_path, replicas, balance)
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
        requests_total = metric_sample(exposition, "genai_server_upstream_replica_requests_total", **labels)
        assert requests_total == len(replica.posts)
        errors_total = metric_sample(exposition, "genai_server_upstream_replica_errors_total", **labels)
        assert errors_total == len(replica.posts)


async def test_one_replica_gets_one_post(make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    """With no other replica to go to, a failed request is not posted again to the one there is."""
    replica = await _replica(aiohttp_server, ERROR_EVENT)
    gateway = await _gateway(make_client, tmp_path, [replica], "least_in_flight")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "alone"}]}
    resp = await gateway.post("/v1/chat/completions", json=body)
    assert resp.status == 502
    assert replica.posts == ["alone"]
