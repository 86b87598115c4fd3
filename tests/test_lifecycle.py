"""Liveness, readiness and graceful shutdown: in-process drains and a real process on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.bodies import MODEL_ID, chat_body, long_stream
from tests.harness.in_process import ClientFactory
from tests.harness.process import ServerProcess
from tests.harness.responses import stream_chunks
from tests.harness.waiting import eventually_async


async def test_live_and_ready(client: Any) -> None:
    assert await (await client.get("/health/live")).json() == {"status": "alive"}
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert (await ready.json())["models"] == [MODEL_ID]


async def test_a_drain_turns_not_ready_and_lets_the_stream_finish(make_client: ClientFactory) -> None:
    client = await make_client(shutdown_timeout=30)
    stream = await client.post("/v1/chat/completions", json=long_stream(1900))
    await stream.content.readline()
    shutdown = asyncio.create_task(client.app.shutdown())

    async def not_ready() -> tuple[int, Any] | None:
        """Readiness once the shutdown task has begun the drain (until then, still ready)."""
        probe = await client.get("/health/ready")
        return None if probe.status == 200 else (probe.status, await probe.json())

    assert await eventually_async(not_ready) == (503, {"status": "draining"})
    chunks = stream_chunks((await stream.read()).decode())
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
    await shutdown


async def test_past_the_timeout_streams_end_with_an_error_event(make_client: ClientFactory) -> None:
    client = await make_client(shutdown_timeout=0)
    stream = await client.post("/v1/chat/completions", json=long_stream(1900))
    await stream.content.readline()
    await client.app.shutdown()
    events = (await stream.read()).decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert (error["code"], error["type"]) == ("shutting_down", "server_error")


@pytest.mark.parametrize(("timeout", "finished"), [("30", True), ("0", False)])
async def test_sigterm_with_a_stream_in_flight(tmp_path: Path, timeout: str, finished: bool) -> None:
    with ServerProcess(tmp_path / "server.log", SHUTDOWN_TIMEOUT=timeout) as server:
        proc = server.proc
        await asyncio.to_thread(server.wait_healthy)
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{server.url}/v1/chat/completions", json=long_stream(1900))
            await resp.content.readline()
            proc.send_signal(signal.SIGTERM)
            body = (await resp.read()).decode()
        await asyncio.to_thread(proc.wait, timeout=60)
        stderr = server.log()
    assert proc.returncode == 0, stderr
    events = body.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    if finished:
        assert last["choices"][0]["finish_reason"] == "length"
    else:
        assert last["error"]["code"] == "shutting_down"


async def test_an_engine_that_dies_fails_every_probe_and_every_request(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the engine in the server's own process (ENGINE_PROCESS=false), the owner thread dies (a fault injected
    outside any engine call): what is in flight gets an error, the probes turn 503 so an orchestrator restarts the
    server, and later requests fail at once instead of hanging. (Behind its process wall the engine is restarted
    instead: test_engine_process.py.)"""
    from genai_server.embedded import scheduler

    admit = scheduler.BatchScheduler._admit

    def broken(self: scheduler.BatchScheduler) -> None:
        if any(job.options.max_tokens == 1234 for job in self._waiting):
            raise RuntimeError("injected scheduler fault")
        admit(self)

    monkeypatch.setattr(scheduler.BatchScheduler, "_admit", broken)
    client = await make_client(engine_process=False)
    assert (await client.get("/health/ready")).status == 200
    doomed = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1234))
    assert (doomed.status, (await doomed.json())["error"]["code"]) == (500, "engine_error")
    for probe in ("/health", "/health/live", "/health/ready"):
        assert (await client.get(probe)).status == 503
    later = await client.post("/v1/chat/completions", json=chat_body())
    assert (later.status, (await later.json())["error"]["code"]) == (500, "engine_error")
