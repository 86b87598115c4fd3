"""Several replicas behind one model id, with real processes: three ``python -m genai_server`` upstreams on the
bundled model and a gateway in front of them. Load spreads; a replica killed mid-run costs no client an error
before its first byte; a replica stopped is ejected, and re-admitted when it is back."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.process import ServerProcess
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually, eventually_async

# Four processes on the bundled model: `-m 'not slow'` leaves them out of a quick run.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "replicated"
SETTLE_S = 20.0  # generous: a few health-probe rounds (2 s each)


class Fleet:
    """Three upstream processes and a gateway whose models file lists them as one model's replicas."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.upstreams = [ServerProcess(folder / f"upstream-{i}.log") for i in range(3)]
        urls = ", ".join(f'"{upstream.url}/v1"' for upstream in self.upstreams)
        models = folder / "models.toml"
        models.write_text(
            f'[[models]]\nid = "{MODEL}"\nbackend = "openai"\nupstream_model = "{MODEL_ID}"\nurls = [{urls}]\n'
        )
        self.gateway = ServerProcess(folder / "gateway.log", MODELS_FILE=str(models), LOG_FORMAT="json")

    def restart(self, index: int) -> None:
        """The replica back, on its own address."""
        self.upstreams[index].stop()
        port = self.upstreams[index].port
        self.upstreams[index] = ServerProcess(self.folder / f"upstream-{index}-again.log", port=port)
        self.upstreams[index].wait_healthy()  # stopped with the fleet even if it never comes up

    def replica(self, index: int) -> str:
        return f"{self.upstreams[index].url}/v1"

    def stop(self) -> None:
        for server in (self.gateway, *self.upstreams):
            server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        for upstream in fleet.upstreams:
            upstream.wait_healthy()
        fleet.gateway.wait_healthy()
        _wait_admitted(fleet)  # the gateway may have probed a replica before it was up
        yield fleet
    finally:
        fleet.stop()


def _wait_admitted(fleet: Fleet) -> None:
    def admitted() -> bool:
        with urllib.request.urlopen(f"{fleet.gateway.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return all(_healthy(text, fleet, i) for i in range(3))

    eventually(admitted, timeout=SETTLE_S, interval=0.2, what="every replica admitted")


def _healthy(text: str, fleet: Fleet, index: int) -> bool:
    return metric_sample(text, "genai_server_upstream_replica_healthy", model=MODEL, replica=fleet.replica(index)) == 1


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _metrics(session: aiohttp.ClientSession, fleet: Fleet) -> str:
    async with session.get(f"{fleet.gateway.url}/metrics") as resp:
        return await resp.text()


async def _ejected(session: aiohttp.ClientSession, fleet: Fleet) -> bool:
    """Replica 1 counted unhealthy, and its ejection logged."""
    log = [json.loads(line) for line in fleet.gateway.log_lines()]
    logged = any(line["message"] == "replica ejected" and line["replica"] == fleet.replica(1) for line in log)
    return logged and not _healthy(await _metrics(session, fleet), fleet, 1)


async def _readmitted(session: aiohttp.ClientSession, fleet: Fleet) -> bool:
    return _healthy(await _metrics(session, fleet), fleet, 1)


def _requests(text: str, fleet: Fleet) -> list[float]:
    return [
        metric_sample(text, "genai_server_upstream_replica_requests_total", model=MODEL, replica=fleet.replica(i))
        for i in range(3)
    ]


async def _stream(session: aiohttp.ClientSession, fleet: Fleet) -> str:
    """One streamed chat: 'ok', 'error after the first byte', or the status it failed with before any."""
    body = chat_body(model=MODEL, max_tokens=200, min_tokens=200, stream=True)
    async with session.post(f"{fleet.gateway.url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return f"status {resp.status}: {await resp.text()}"
        events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    if events[-1] == "[DONE]" and not any('"error"' in event for event in events):
        return "ok"
    return "error after the first byte"


async def test_requests_spread_over_every_replica(session: aiohttp.ClientSession, fleet: Fleet) -> None:
    before = _requests(await _metrics(session, fleet), fleet)
    for _ in range(3):
        outcomes = await asyncio.gather(*[_stream(session, fleet) for _ in range(9)])
        assert outcomes == ["ok"] * 9
    sent = [
        after - prior for after, prior in zip(_requests(await _metrics(session, fleet), fleet), before, strict=True)
    ]
    assert sum(sent) == 27
    assert min(sent) >= 4, f"least in flight should spread 27 requests, 9 at a time, over 3 replicas: {sent}"


async def test_a_replica_killed_mid_run_costs_no_error_before_the_first_byte(
    session: aiohttp.ClientSession, fleet: Fleet
) -> None:
    """Clients keep streaming while one replica is killed (SIGKILL): a request on it that had already streamed may
    end with an error event; every other one is answered, by another replica if need be."""
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def client() -> None:
        while not stop.is_set():
            outcomes.append(await _stream(session, fleet))

    clients = [asyncio.create_task(client()) for _ in range(6)]
    await asyncio.sleep(1.0)  # the clients' pace: they stream a while before the kill, and a while after it
    fleet.upstreams[1].proc.send_signal(signal.SIGKILL)
    await asyncio.sleep(3.0)
    stop.set()
    await asyncio.gather(*clients)
    assert all(outcome in ("ok", "error after the first byte") for outcome in outcomes), outcomes
    assert outcomes.count("ok") >= len(outcomes) - 6  # at most the streams the killed replica was serving
    # The gateway ejects the replica on a failed request or its next probe (every 2 s), whichever comes first.
    await eventually_async(lambda: _ejected(session, fleet), timeout=SETTLE_S, interval=0.2)
    metrics = await _metrics(session, fleet)
    assert metric_sample(metrics, "genai_server_upstream_replica_healthy", model=MODEL, replica=fleet.replica(1)) == 0
    async with session.get(f"{fleet.gateway.url}/health/ready") as resp:
        assert resp.status == 200, "two replicas of three still serve"
    log = [json.loads(line) for line in fleet.gateway.log().splitlines()]
    assert any(line["message"] == "replica ejected" and line["replica"] == fleet.replica(1) for line in log)

    fleet.restart(1)
    await eventually_async(
        lambda: _readmitted(session, fleet), timeout=SETTLE_S, interval=0.2, what="the replica re-admitted"
    )
    before = _requests(await _metrics(session, fleet), fleet)[1]
    assert await asyncio.gather(*[_stream(session, fleet) for _ in range(9)]) == ["ok"] * 9
    assert _requests(await _metrics(session, fleet), fleet)[1] > before, "the re-admitted replica takes work again"


async def test_readiness_needs_one_replica_of_every_model(session: aiohttp.ClientSession, fleet: Fleet) -> None:
    """Runs last: stops every replica."""
    for upstream in fleet.upstreams:
        upstream.stop()

    async def unready() -> Any:
        """The readiness answer once it is a 503 (until the probes notice, still ready)."""
        async with session.get(f"{fleet.gateway.url}/health/ready") as resp:
            return await resp.json() if resp.status == 503 else None

    answer = await eventually_async(
        unready, timeout=SETTLE_S, interval=0.2, what="readiness noticing that no replica answers"
    )
    assert answer["models"] == [MODEL]
