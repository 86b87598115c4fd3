"""Admission by time-to-first-token objective, against the process we ship: a request that cannot meet its objective
with the work already ahead of it is refused at once (429 ``slo_unattainable``, ``Retry-After``); one that can, or
that has nothing ahead of it, is served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from genai_server.telemetry.ttft_forecast import TtftForecast
from tests.harness.bodies import chat_body, long_stream
from tests.harness.process import ServerProcess
from tests.harness.waiting import eventually_async

# The same prompt for every measured request, so that the one queued ahead weighs what the measured ones did.
PROMPT = "Say something about the weather, the sea and the mountains. " * 8
# One slot (MAX_CONCURRENT_REQUESTS=1): a long stream holds it, and whatever comes next waits in line.


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _chat(session: aiohttp.ClientSession, url: str, objective_ms: str | None = None) -> aiohttp.ClientResponse:
    headers = {"x-slo-ttft-ms": objective_ms} if objective_ms is not None else {}
    resp = await session.post(f"{url}/v1/chat/completions", json=chat_body(PROMPT, max_tokens=2), headers=headers)
    await resp.read()
    return resp


async def _waiting(session: aiohttp.ClientSession, url: str, count: int = 1) -> bool:
    """Whether ``count`` requests (or more) wait for a slot."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith("genai_server_num_requests_waiting "))
    return float(line.split()[1]) >= count


@asynccontextmanager
async def _one_waiting(session: aiohttp.ClientSession, url: str) -> AsyncIterator[None]:
    """Three requests measure the server (each admitted whatever its objective: nothing is ahead of it); then a long
    stream takes the one slot and a request waits in line behind it, until the block ends (and it is served)."""
    for _ in range(3):
        assert (await _chat(session, url, objective_ms="1")).status == 200
    async with session.post(f"{url}/v1/chat/completions", json=long_stream()) as holder:
        assert holder.status == 200
        await holder.content.readline()  # its first token: it runs, and holds the slot
        queued = asyncio.create_task(_chat(session, url))  # its answer waits for the slot
        await eventually_async(lambda: _waiting(session, url), what="a request waiting for the slot")
        yield
        holder.close()  # the slot frees: the line moves on
    assert (await queued).status == 200


def _refused(resp: aiohttp.ClientResponse, error: dict[str, str]) -> bool:
    return (
        resp.status == 429
        and error["code"] == "slo_unattainable"
        and error["type"] == "requests"
        and int(resp.headers["Retry-After"]) >= 1
    )


async def test_a_request_that_cannot_meet_its_objective_is_refused_at_once(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Behind a request waiting in line, a request whose objective (its header) is 1 ms is refused, with a
    Retry-After, before it joins the line; one with a generous objective joins it and is served."""
    with ServerProcess(tmp_path / "server.log", MAX_CONCURRENT_REQUESTS="1") as server:
        url = server.wait_healthy().url
        async with _one_waiting(session, url):
            refused = await _chat(session, url, objective_ms="1")
            assert _refused(refused, (await refused.json())["error"])
            generous = asyncio.create_task(_chat(session, url, objective_ms="60000"))
            await eventually_async(lambda: _waiting(session, url, 2), what="the generous request in line too")
        assert (await generous).status == 200


async def test_the_servers_objective_applies_to_a_request_without_one(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """SLO_TTFT_MS is the objective of a request that sends none."""
    with ServerProcess(tmp_path / "server.log", MAX_CONCURRENT_REQUESTS="1", SLO_TTFT_MS="1") as server:
        url = server.wait_healthy().url
        async with _one_waiting(session, url):
            refused = await _chat(session, url)
            assert _refused(refused, (await refused.json())["error"])


async def test_admission_off_refuses_nothing(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """SLO_ADMISSION=false: the same request that would be refused waits its turn and is served."""
    with ServerProcess(
        tmp_path / "server.log", MAX_CONCURRENT_REQUESTS="1", SLO_TTFT_MS="1", SLO_ADMISSION="false"
    ) as server:
        url = server.wait_healthy().url
        async with _one_waiting(session, url):
            served = asyncio.create_task(_chat(session, url, objective_ms="1"))
            await eventually_async(lambda: _waiting(session, url, 2), what="the request waiting in line")
        assert (await served).status == 200


async def test_a_bad_objective_header_is_a_400_naming_it(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    with ServerProcess(tmp_path / "server.log") as server:
        url = server.wait_healthy().url
        for value in ("soon", "0", "-5", "nan", "inf", "1e12"):
            resp = await _chat(session, url, objective_ms=value)
            assert resp.status == 400, value
            error = (await resp.json())["error"]
            assert error["param"] == "x-slo-ttft-ms" and error["code"] == "invalid_header"


def test_the_forecast_counts_only_work_without_a_first_token() -> None:
    """The work ahead is the bytes of requests with no first token yet: a first token or an end takes a request's
    bytes off it, once; each first token measures the rate; nothing ahead, or too few measurements, predicts
    nothing."""
    forecast = TtftForecast()
    for at in (1.0, 2.0, 3.0):  # three lone requests of 100 bytes, each with its first token 0.1 s after arrival
        forecast.arrive(100, at).first_token(at + 0.1)
    assert forecast.rate == pytest.approx(1000.0) and forecast.predict(100) is None  # nothing ahead
    waiting = forecast.arrive(500, 4.0)
    prediction = forecast.predict(100)
    assert prediction is not None and prediction.ttft_s == pytest.approx(0.6) and prediction.retry_after_s == 1
    forecast.finish(waiting)  # ended without a first token (refused later, failed, cancelled)
    forecast.finish(waiting)
    assert forecast.predict(100) is None and forecast.measurements == 3
