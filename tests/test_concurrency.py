"""The concurrency limit: N generation requests in flight, the next an immediate 429."""

from __future__ import annotations

import asyncio
from typing import Any

from genai_server.app_keys import ENGINE, LIMITER
from tests.conftest import chat_body


async def _wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a generous limit that only catches hangs)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_request_over_the_limit_gets_429_with_retry_after(make_client: Any, openai_schema: Any) -> None:
    client = await make_client(max_concurrent_requests=2)
    long = chat_body(max_tokens=1500, stream=True)
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


async def test_burst_gets_only_200_or_429(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=3)

    async def one() -> int:
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=600))
        await resp.read()
        return int(resp.status)

    statuses = await asyncio.gather(*[one() for _ in range(12)])
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 3
    assert statuses.count(429) >= 1
    assert client.app[LIMITER].in_flight == 0


async def test_client_disconnect_mid_stream_frees_the_slot_and_the_engine(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2000, stream=True))
    await resp.content.readline()
    resp.close()  # the client goes away mid-stream
    await _wait_until(lambda: client.app[LIMITER].in_flight == 0 and client.app[ENGINE].active_sequences() == 0)
    again = await client.post("/v1/chat/completions", json=chat_body())
    assert again.status == 200
