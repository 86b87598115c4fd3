"""MODELS_DIR against the process we ship: three built test models (copies of the bundled one) and a broken folder,
room for two. Each model is listed with its status; a request loads its model, the least recently used idle one
makes room (its memory freed), concurrent first requests share one load, a generating model is never unloaded (503
when nothing can go), an idle one goes after MODEL_TTL_S, /models/load and /models/unload work behind the key, and
the broken folder fails only its own requests."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import LONG_PROMPT
from tests.harness.process import ServerProcess
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually_async

KEY = "models-dir-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for name in MODELS:
        shutil.copytree(BUNDLED_MODEL, folder / name)
    (folder / "broken").mkdir()
    (folder / "broken" / "genai_config.json").write_text('{"model": {')  # cut short: it cannot load
    return folder


@pytest.fixture
def server(models_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "server.log", MODELS_DIR=str(models_dir), MAX_LOADED_MODELS="2", API_KEYS=KEY) as s:
        yield s.wait_healthy()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as client:
        yield client


async def _statuses(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with session.get(f"{url}/v1/models") as resp:
        return {card["id"]: card["status"] for card in (await resp.json())["data"]}


async def _chat(session: aiohttp.ClientSession, url: str, model: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def _metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as resp:
        return await resp.text()


def _tree_rss_mb(pid: int) -> float:
    """The server's resident memory with its engine processes'."""
    own = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own / 1024 + sum(_tree_rss_mb(int(child)) for child in children)


async def test_models_are_loaded_when_asked_and_the_least_recently_used_makes_room(
    server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    listed = await _statuses(session, server.url)
    assert listed == {"alpha": "unloaded", "beta": "unloaded", "broken": "unloaded", "gamma": "unloaded"}
    idle_rss = _tree_rss_mb(server.proc.pid)
    for model in ("alpha", "beta"):
        assert (await _chat(session, server.url, model))[0] == 200
    two_rss = _tree_rss_mb(server.proc.pid)
    await _chat(session, server.url, "alpha")  # alpha used last: beta is the least recently used
    assert (await _chat(session, server.url, "gamma"))[0] == 200
    statuses = await _statuses(session, server.url)
    assert (statuses["alpha"], statuses["beta"], statuses["gamma"]) == ("loaded", "unloaded", "loaded")
    # Unloading frees the engine's memory (its process ends): measured ~70 MB per bundled model here.
    for model in ("alpha", "gamma"):
        async with session.post(f"{server.url}/models/unload", json={"model": model}) as resp:
            assert resp.status == 200 and await resp.json() == {"success": True}
    await eventually_async(
        lambda: _tree_rss_mb(server.proc.pid) < idle_rss + (two_rss - idle_rss) / 4,
        what="the server's memory back near where it was with nothing loaded",
    )
    text = await _metrics(session, server.url)
    assert metric_sample(text, "genai_server_model_loads_total", model="alpha") == 1
    assert metric_sample(text, "genai_server_model_unloads_total", model="beta") == 1
    assert metric_sample(text, "genai_server_model_loaded", model="gamma") == 0


async def test_concurrent_first_requests_share_one_load(server: ServerProcess, session: aiohttp.ClientSession) -> None:
    answers = await asyncio.gather(*(_chat(session, server.url, "beta") for _ in range(6)))
    assert [status for status, _ in answers] == [200] * 6
    assert metric_sample(await _metrics(session, server.url), "genai_server_model_loads_total", model="beta") == 1


async def test_a_generating_model_is_never_unloaded(server: ServerProcess, session: aiohttp.ClientSession) -> None:
    # 16 long sequences, read no further than their first line: alpha generates (or waits on this client) for as
    # long as the test holds the stream.
    long = {
        "model": "alpha",
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 1900,
        "min_tokens": 1900,  # no early end of sequence: every one of them runs the whole length
        "n": 16,
        "stream": True,
    }
    holding = await session.post(f"{server.url}/v1/chat/completions", json=long)
    await holding.content.readline()  # the stream has begun: alpha is generating
    try:
        assert (await _chat(session, server.url, "beta"))[0] == 200
        assert (await _chat(session, server.url, "gamma"))[0] == 200  # beta (idle) made room, not alpha
        statuses = await _statuses(session, server.url)
        assert (statuses["alpha"], statuses["beta"]) == ("loaded", "unloaded")
        second = await session.post(f"{server.url}/v1/chat/completions", json={**long, "model": "gamma"})
        await second.content.readline()
        status, refused = await _chat(session, server.url, "beta")  # both loaded models generate: none can go
        assert status == 503 and refused["error"]["code"] == "models_busy"
        async with session.post(f"{server.url}/models/unload", json={"model": "alpha"}) as resp:
            assert resp.status == 409
        second.close()
    finally:
        holding.close()


async def test_a_broken_folder_fails_its_own_requests_only(
    server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    status, failed = await _chat(session, server.url, "broken")
    assert (
        status == 500 and failed["error"]["code"] == "model_loading_failed" and "broken" in failed["error"]["message"]
    )
    assert (await _statuses(session, server.url))["broken"] == "failed"
    assert (await _chat(session, server.url, "alpha"))[0] == 200
    assert "model could not be loaded" in server.log()
    assert "genai_config.json cannot be read" in server.log()  # said at start-up already


async def test_load_and_unload_need_the_key(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as stranger:
        for path in ("/models/load", "/models/unload"):
            async with stranger.post(f"{server.url}{path}", json={"model": "alpha"}) as resp:
                assert resp.status == 401
    async with aiohttp.ClientSession(headers=AUTH) as owner:
        async with owner.post(f"{server.url}/models/load", json={"model": "alpha"}) as resp:
            assert resp.status == 200
        assert (await _statuses(owner, server.url))["alpha"] == "loaded"


async def test_an_idle_model_is_unloaded_after_its_ttl(models_dir: Path, tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server.log", MODELS_DIR=str(models_dir), MODEL_TTL_S="1") as server:
        server.wait_healthy()
        async with aiohttp.ClientSession() as session:
            assert (await _chat(session, server.url, "alpha"))[0] == 200
            assert (await _statuses(session, server.url))["alpha"] == "loaded"
            await eventually_async(
                lambda: _is_unloaded(session, server.url, "alpha"), timeout=30, what="alpha unloaded once idle"
            )


async def _is_unloaded(session: aiohttp.ClientSession, url: str, model: str) -> bool:
    return (await _statuses(session, url))[model] == "unloaded"


async def test_clients_that_leave_at_once_give_their_model_back(
    server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    """Each sends a streamed request and goes before any answer (while the model loads, or before its first
    chunk): the model is held by none of them afterwards, so it can be unloaded."""
    body = json.dumps(
        {"model": "gamma", "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 50, "stream": True}
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(5):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        writer.close()
    await eventually_async(
        lambda: _unloads(session, server.url, "gamma"), timeout=30, what="gamma unloadable: no request holds it"
    )
    # They did reach it: it was loaded for them (and is now unloaded, not held by a request that left).
    assert metric_sample(await _metrics(session, server.url), "genai_server_model_loads_total", model="gamma") >= 1


async def _unloads(session: aiohttp.ClientSession, url: str, model: str) -> bool:
    async with session.post(f"{url}/models/unload", json={"model": model}) as resp:
        return resp.status == 200


async def test_the_memory_budget_makes_room_too(models_dir: Path, tmp_path: Path) -> None:
    """Each bundled copy counts as its files plus 80 MB: 170 MB holds two of them, whatever MAX_LOADED_MODELS
    allows; one that alone exceeds the budget is refused by name."""
    with ServerProcess(
        tmp_path / "server.log", MODELS_DIR=str(models_dir), MAX_LOADED_MODELS="3", MODELS_MEMORY_MB="170"
    ) as server:
        server.wait_healthy()
        async with aiohttp.ClientSession() as session:
            for model in ("alpha", "beta", "gamma"):
                assert (await _chat(session, server.url, model))[0] == 200
            statuses = await _statuses(session, server.url)
            assert (statuses["alpha"], statuses["beta"], statuses["gamma"]) == ("unloaded", "loaded", "loaded")
    with ServerProcess(tmp_path / "small.log", MODELS_DIR=str(models_dir), MODELS_MEMORY_MB="50") as server:
        server.wait_healthy()
        async with aiohttp.ClientSession() as session:
            status, refused = await _chat(session, server.url, "alpha")
            assert status == 500 and "MODELS_MEMORY_MB" in refused["error"]["message"]


async def test_a_models_file_entry_may_be_loaded_on_demand_with_its_own_ttl(models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        f"[[models]]\nid = 'delta'\nbackend = 'onnx'\npath = '{models_dir / 'alpha'}'\non_demand = true\nttl_s = 1\n"
    )
    with ServerProcess(tmp_path / "server.log", MODELS_FILE=str(models), MODELS_DIR=str(models_dir)) as server:
        server.wait_healthy()
        async with aiohttp.ClientSession() as session:
            assert (await _statuses(session, server.url))["delta"] == "unloaded"
            for model in ("delta", "beta"):
                assert (await _chat(session, server.url, model))[0] == 200
            await eventually_async(
                lambda: _is_unloaded(session, server.url, "delta"), timeout=30, what="delta unloaded after its ttl"
            )
            assert (await _statuses(session, server.url))["beta"] == "loaded"  # MODEL_TTL_S 0: kept


async def test_with_admin_keys_only_they_load_and_unload(models_dir: Path, tmp_path: Path) -> None:
    """One tenant's key must not evict another's models: with ADMIN_API_KEYS, /models/* need one of them (403 to
    other keys); an admin key serves the API like any key."""
    admin = {"Authorization": "Bearer admin-key"}
    with ServerProcess(
        tmp_path / "server.log", MODELS_DIR=str(models_dir), API_KEYS=KEY, ADMIN_API_KEYS="admin-key"
    ) as server:
        server.wait_healthy()
        async with aiohttp.ClientSession() as session:
            for path in ("/models/load", "/models/unload"):
                async with session.post(f"{server.url}{path}", json={"model": "alpha"}, headers=AUTH) as resp:
                    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
                async with session.post(f"{server.url}{path}", json={"model": "alpha"}, headers=admin) as resp:
                    assert resp.status == 200
            body = {"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            async with session.post(f"{server.url}/v1/chat/completions", json=body, headers=admin) as resp:
                assert resp.status == 200
