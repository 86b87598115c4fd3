"""Admission by time-to-first-token objective, against the process we ship: a request that cannot meet its objective
with the work already ahead of it is refused at once (429 ``slo_unattainable``, ``Retry-After``); one that can, or
that has nothing ahead of it, is served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.harness.bodies import chat_body, long_stream
from tests.harness.process import ServerProcess
from tests.harness.waiting import eventually_async

# The same prompt for every measured request, so that the one queued ahead weighs what the measured ones did.
PROMPT = "Say something about the weather, the sea and the mountains. " * 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One slot: a long stream holds it, and whatever comes next waits in line."""
    log = tmp_path_factory.mktemp("slo") / "server.log"
    with ServerProcess(log, MAX_CONCURRENT_REQUESTS="1", MAX_QUEUED_REQUESTS="8") as proc:
        yield proc.wait_healthy()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _chat(session: aiohttp.ClientSession, url: str, objective_ms: str | None = None) -> aiohttp.ClientResponse:
    headers = {"x-slo-ttft-ms": objective_ms} if objective_ms is not None else {}
    resp = await session.post(f"{url}/v1/chat/completions", json=chat_body(PROMPT, max_tokens=2), headers=headers)
    await resp.read()
    return resp


async def _waiting(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith("genai_server_num_requests_waiting "))
    return float(line.split()[1]) >= 1


async def test_a_request_that_cannot_meet_its_objective_is_refused_at_once(
    server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    """Three requests measure the server (each admitted: nothing is ahead of it, whatever its objective). Then a
    long stream takes the one slot and a request waits in line: a request whose objective is 1 ms is refused,
    with a Retry-After, before it joins the line; one with a generous objective joins it and is served."""
    for _ in range(3):
        assert (await _chat(session, server.url, objective_ms="1")).status == 200  # nothing ahead: admitted

    async with session.post(f"{server.url}/v1/chat/completions", json=long_stream()) as holder:
        assert holder.status == 200
        await holder.content.readline()  # its first token: it runs, and holds the slot
        queued = asyncio.create_task(_chat(session, server.url))  # its answer waits for the slot
        await eventually_async(lambda: _waiting(session, server.url), what="a request waiting for the slot")

        refused = await _chat(session, server.url, objective_ms="1")
        assert refused.status == 429
        error = (await refused.json())["error"]
        assert error["code"] == "slo_unattainable" and error["type"] == "requests"
        assert int(refused.headers["Retry-After"]) >= 1
        holder.close()  # the slot frees: the line moves on
        assert (await queued).status == 200

    assert (await _chat(session, server.url, objective_ms="60000")).status == 200


async def test_a_bad_objective_header_is_a_400_naming_it(server: ServerProcess, session: aiohttp.ClientSession) -> None:
    for value in ("soon", "0", "-5", "nan", "inf", "1e12"):
        resp = await _chat(session, server.url, objective_ms=value)
        assert resp.status == 400, value
        error = (await resp.json())["error"]
        assert error["param"] == "x-slo-ttft-ms" and error["code"] == "invalid_header"
