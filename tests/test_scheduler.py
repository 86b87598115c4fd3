"""The batching scheduler, seen from clients: batching changes nothing a client sees but the speed."""

from __future__ import annotations

import asyncio
from typing import Any

from genai_server.http.app_keys import LIMITER
from tests.harness.bodies import chat_body, long_stream
from tests.harness.in_process import embedded_engine
from tests.harness.responses import assert_same_greedy_text, stream_chunks
from tests.harness.waiting import eventually_async


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
    for (text, usage), (expected_text, expected_usage) in zip(together, alone, strict=True):
        assert usage["prompt_tokens"] == expected_usage["prompt_tokens"]  # exact usage per request
        assert_same_greedy_text(text, expected_text)


async def _one_batch(client: Any, *, cancel_first: bool) -> list[tuple[str, dict[str, Any]]]:
    """One long stream and three 300-token chats started as one static batch (the batch waits 300 ms for its
    burst); the stream's client leaves after its first events when ``cancel_first``."""
    leaving = asyncio.create_task(client.post("/v1/chat/completions", json=long_stream(1500)))
    staying = [asyncio.create_task(_text(client, content=f"story {i}", max_tokens=300)) for i in range(3)]
    stream = await leaving
    await stream.content.readline()
    await stream.content.readline()
    if cancel_first:
        stream.close()  # one client of the batch disconnects mid-stream
    else:
        await stream.read()
    return list(await asyncio.gather(*staying))


async def test_cancelling_one_sequence_leaves_the_rest_of_its_batch_intact(make_client: Any) -> None:
    client = await make_client(engine_max_batch_size=4, engine_lanes=1, engine_batch_wait_ms=300)
    # Compared with the same batch left whole, not with each sequence alone: batching itself may flip late
    # near-ties on some CPUs, and that is not what this test is about.
    expected = await _one_batch(client, cancel_first=False)
    got = await _one_batch(client, cancel_first=True)
    for (text, usage), (expected_text, expected_usage) in zip(got, expected, strict=True):
        assert usage["prompt_tokens"] == expected_usage["prompt_tokens"]
        assert_same_greedy_text(text, expected_text)
    await eventually_async(
        lambda: embedded_engine(client.app).active_sequences() == 0 and client.app[LIMITER].in_flight == 0
    )


async def test_a_new_request_does_not_wait_for_a_running_batch(make_client: Any) -> None:
    # No kept sequences: each long stream, arriving alone, would otherwise run on a Generator, not in a lane's batch.
    client = await make_client(
        engine_max_batch_size=4, engine_lanes=2, max_concurrent_requests=8, prefix_cache_conversations=0
    )
    long_streams = [await client.post("/v1/chat/completions", json=long_stream(1900)) for _ in range(3)]
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
    *greedy, seeded_result = await asyncio.gather(
        *[_text(client, content=f"g{i}", max_tokens=30) for i in range(3)], _text(client, **seeded)
    )
    assert seeded_result == seeded_alone  # a seeded Generator runs on its own: exactly repeatable
    for (text, usage), (expected_text, expected_usage) in zip(greedy, greedy_alone, strict=True):
        assert usage["prompt_tokens"] == expected_usage["prompt_tokens"]
        assert_same_greedy_text(text, expected_text)
