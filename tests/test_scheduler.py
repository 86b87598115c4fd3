"""The batching scheduler, seen from clients: batching changes nothing a client sees but the speed."""

from __future__ import annotations

import asyncio
from typing import Any

from genai_server.app_keys import ENGINE, LIMITER
from tests.conftest import chat_body, long_stream, stream_chunks
from tests.test_concurrency import _wait_until


async def _text(client: Any, **body: Any) -> tuple[str, dict[str, Any]]:
    resp = await client.post("/v1/chat/completions", json=chat_body(**body))
    assert resp.status == 200
    result = await resp.json()
    return result["choices"][0]["message"]["content"], result["usage"]


async def test_batched_sequences_match_their_output_alone(make_client: Any) -> None:
    client = await make_client(engine_max_batch_size=8, engine_lanes=1)
    prompts = ["alpha", "a much longer prompt about rivers and mountains", "3", "hello world"]
    alone = [await _text(client, content=p, max_tokens=24) for p in prompts]
    together = await asyncio.gather(*[_text(client, content=p, max_tokens=24) for p in prompts])
    assert together == alone  # same text and the same exact usage per request


async def test_cancelling_one_sequence_leaves_the_rest_of_its_batch_intact(make_client: Any) -> None:
    client = await make_client(engine_max_batch_size=4, engine_lanes=1)
    expected = [await _text(client, content=f"story {i}", max_tokens=300) for i in range(3)]

    leaving = await client.post("/v1/chat/completions", json=long_stream(1500))
    staying = [asyncio.create_task(_text(client, content=f"story {i}", max_tokens=300)) for i in range(3)]
    await leaving.content.readline()
    await leaving.content.readline()
    leaving.close()  # one client of the batch disconnects mid-stream

    assert await asyncio.gather(*staying) == expected
    await _wait_until(lambda: client.app[ENGINE].active_sequences() == 0 and client.app[LIMITER].in_flight == 0)


async def test_a_new_request_does_not_wait_for_a_running_batch(make_client: Any) -> None:
    client = await make_client(engine_max_batch_size=4, engine_lanes=2, max_concurrent_requests=8)
    long_streams = [await client.post("/v1/chat/completions", json=long_stream(1900))
                    for _ in range(3)]
    for resp in long_streams:
        await resp.content.readline()  # the batch is running

    _, usage = await _text(client, content="quick one", max_tokens=5)
    assert usage["completion_tokens"] == 5
    for resp in long_streams:
        assert not resp.content.at_eof(), "the short request finished before the long batch"
    for resp in long_streams:
        chunks = stream_chunks((await resp.read()).decode())
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def test_seeded_and_batched_requests_run_side_by_side(client: Any) -> None:
    seeded = {"temperature": 0.9, "seed": 11, "max_tokens": 30}
    greedy_alone = [await _text(client, content=f"g{i}", max_tokens=30) for i in range(3)]
    seeded_alone = await _text(client, **seeded)
    results = await asyncio.gather(*[_text(client, content=f"g{i}", max_tokens=30) for i in range(3)],
                                   _text(client, **seeded))
    assert results == [*greedy_alone, seeded_alone]
