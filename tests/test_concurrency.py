"""The concurrency limit: N generation requests in flight, the next an immediate 429."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from genai_server.http.app_keys import LIMITER
from genai_server.http.concurrency import ConcurrencyLimiter
from tests.harness.bodies import LONG_PROMPT, MODEL_ID, chat_body, long_stream
from tests.harness.in_process import embedded_engine
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually_async


async def test_request_over_the_limit_gets_429_with_retry_after(make_client: Any, openai_schema: Any) -> None:
    client = await make_client(max_concurrent_requests=2, max_queued_requests=0)
    long = long_stream(1500)
    streams = [await client.post("/v1/chat/completions", json=long) for _ in range(2)]
    for resp in streams:
        assert resp.status == 200
        await resp.content.readline()  # the stream has started: its slot is taken

    refused = await client.post("/v1/chat/completions", json=chat_body())
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    body = await refused.json()
    openai_schema("ErrorResponse", body)
    assert body["error"]["code"] == "rate_limit_exceeded"

    assert (await client.get("/v1/models")).status == 200  # listing never counts against the limit
    assert (await client.get("/health")).status == 200
    for resp in streams:
        assert (await resp.text()).endswith("data: [DONE]\n\n")  # slot held until the stream ended
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


async def _status(client: Any, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.read()
    return int(resp.status), resp.headers


async def test_a_burst_waits_in_the_queue_and_all_succeed(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=3, max_queued_requests=32)
    results = await asyncio.gather(*[_status(client, chat_body(max_tokens=300)) for _ in range(12)])
    assert [status for status, _ in results] == [200] * 12
    # The ones that waited for a slot report it as queue time, apart from the engine's own.
    assert max(float(headers["x-queue-time"]) for _, headers in results) > 0
    assert client.app[LIMITER].in_flight == 0
    assert results[0][1]["x-ratelimit-limit-requests"] == "35"


async def test_beyond_the_queue_only_429_with_an_estimate(make_client: Any, openai_schema: Any) -> None:
    client = await make_client(max_concurrent_requests=2, max_queued_requests=2)
    results = await asyncio.gather(*[_status(client, chat_body(max_tokens=600)) for _ in range(12)])
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429}
    assert statuses.count(200) >= 4  # two running, two waiting
    for status, headers in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_waiting_longer_than_the_queue_timeout_is_429(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1, max_queued_requests=4, queue_timeout=0.05)
    stream = await client.post("/v1/chat/completions", json=long_stream(1900))
    await stream.content.readline()  # the only slot is taken
    status, _ = await _status(client, chat_body())
    assert status == 429
    body = await (await client.post("/v1/chat/completions", json=chat_body())).json()
    assert "Waited 0.05 s" in body["error"]["message"]
    assert (await client.get("/v1/models")).status == 200  # never queued
    stream.close()


async def test_the_queue_is_served_in_arrival_order() -> None:
    limiter = ConcurrencyLimiter(limit=1, max_queued=8, queue_timeout_s=10)
    await limiter.acquire()  # the only slot is taken
    served: list[int] = []

    async def wait_turn(i: int) -> None:
        await limiter.acquire()
        served.append(i)
        limiter.release(0.01)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(wait_turn(i)))
        await eventually_async(lambda: limiter.queued == len(tasks))  # it joined the line before the next comes
    assert limiter.queued == 4
    limiter.release(0.01)
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_a_waiter_that_leaves_gives_its_place_up() -> None:
    limiter = ConcurrencyLimiter(limit=1, max_queued=1, queue_timeout_s=10)
    await limiter.acquire()
    leaving = asyncio.create_task(limiter.acquire())
    await eventually_async(lambda: limiter.queued == 1)  # in the line, then it leaves
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert limiter.queued == 0
    limiter.release(0.01)
    assert limiter.in_flight == 0


async def test_client_disconnect_mid_stream_frees_the_slot_and_the_engine(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1)
    resp = await client.post("/v1/chat/completions", json=long_stream(2000))
    await resp.content.readline()
    resp.close()  # the client goes away mid-stream
    await eventually_async(
        lambda: client.app[LIMITER].in_flight == 0 and embedded_engine(client.app).active_sequences() == 0
    )
    again = await client.post("/v1/chat/completions", json=chat_body())
    assert again.status == 200


async def test_a_client_that_leaves_a_non_streaming_request_frees_everything(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1)
    _, writer = await asyncio.open_connection(client.server.host, client.server.port)
    body = json.dumps(chat_body(content=LONG_PROMPT, max_tokens=1900)).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    await eventually_async(lambda: embedded_engine(client.app).active_sequences() == 1)  # generating
    writer.close()  # the client goes away before the answer
    await writer.wait_closed()
    await eventually_async(
        lambda: client.app[LIMITER].in_flight == 0 and embedded_engine(client.app).active_sequences() == 0
    )
    text = await (await client.get("/metrics")).text()
    assert metric_sample(text, "genai_server_client_disconnects_total", model=MODEL_ID) == 1
    assert metric_sample(text, "genai_server_requests_total", model=MODEL_ID, status="499") == 1
