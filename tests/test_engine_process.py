"""The engine behind its process wall, in the process we ship: ``python -m genai_server`` with the embedded engine in
a supervised process of its own (``genai_server/embedded/engine_process.py``).

Native code reached by a client (the grammar compiler) can crash, grow or stall the process it runs in, and no
known payload still does once the schema bounds hold (``test_hostile.py``), so the faults are injected where the
compiler runs: a ``sitecustomize`` on the engine process's path wraps the scheduler's compile step and, for a
grammar carrying a marker, raises SIGSEGV, allocates without end, or holds the GIL for seconds, exactly as the
measured native failures did. Everything else is real: the server, the engine process, the model, the client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from genai_server.exit_status import ExitStatus
from tests.harness.bodies import chat_body
from tests.harness.liveness import LIVENESS_BOUND_S, Liveness
from tests.harness.process import REPO, ServerProcess
from tests.harness.responses import sse_events
from tests.harness.waiting import eventually, eventually_async

SETTLE_S = 30.0
MEMORY_CAP_MB = 600

_FAULTS = '''
"""Faults injected where the engine process compiles a client's grammar (test double for native failures)."""
import contextlib
import mmap
import os
import re
import signal

from genai_server.embedded import scheduler

_compiling = scheduler.BatchScheduler._compiling
_admit = scheduler.BatchScheduler._admit
_held = []


@contextlib.contextmanager
def _faulty_compile(self, options):
    with _compiling(self, options):
        grammar = options.guidance[1] if options.guidance else ""
        if "FAULT-SEGV" in grammar:  # the $ref chain that overflowed the compiler's stack
            os.kill(os.getpid(), signal.SIGSEGV)
        if "FAULT-GROW-PRIVATE" in grammar:  # the array bound that allocated gigabytes (freed when it fails)
            [bytearray(64 << 20) for _ in range(1024)]
        if "FAULT-GROW-SHARED" in grammar:  # memory the data limit does not count: only the server's watch stops it
            for _ in range(1024):
                block = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED)
                for page in range(0, 64 << 20, 4096):
                    block[page] = 1
                _held.append(block)
        if "FAULT-HOLD-GIL" in grammar:  # a compile of seconds in native code that keeps the GIL
            re.match(r"(a|aa)+$", "a" * 37 + "b")
        yield


def _faulty_admit(self):  # a bug of ours on the owner thread, outside any engine call
    if any(job.options.max_tokens == 1234 for job in self._waiting):
        raise RuntimeError("injected scheduler fault")
    _admit(self)


scheduler.BatchScheduler._compiling = _faulty_compile
scheduler.BatchScheduler._admit = _faulty_admit
'''


def _fault_path(tmp_path: Path) -> str:
    """A PYTHONPATH that puts the fault injector in every Python process of the server (the engine's included)."""
    (tmp_path / "sitecustomize.py").write_text(_FAULTS)
    return os.pathsep.join([str(tmp_path), str(REPO)])


def _marked(marker: str) -> dict[str, Any]:
    """A response_format whose grammar carries ``marker``."""
    schema = {"type": "object", "properties": {"x": {"const": marker}}, "required": ["x"]}
    return {"type": "json_schema", "json_schema": {"name": "marked", "schema": schema}}


def _engine_pids(server: ServerProcess) -> list[int]:
    """Each engine process the server started, in order (from its log)."""
    return [int(m) for m in re.findall(r"engine process started pid=(\d+)", server.log())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("faulty")
    with ServerProcess(
        tmp / "server.log",
        ENGINE_MEMORY_BUDGET_MB="16",
        ENGINE_MEMORY_LIMIT_MB=str(MEMORY_CAP_MB),
        PYTHONPATH=_fault_path(tmp),
    ) as server:
        yield server.wait_healthy()


@pytest.fixture
async def session(faulty: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """A client; after the case the server must serve a normal request, with every gauge at 0 and ready."""
    async with aiohttp.ClientSession() as client:
        yield client
        await _still_serves(client, faulty.url)


async def _still_serves(session: aiohttp.ClientSession, url: str) -> None:
    async def ready() -> bool:
        async with session.get(f"{url}/health/ready") as resp:
            return resp.status == 200

    await eventually_async(ready, timeout=SETTLE_S, what="/health/ready 200 again")
    async with session.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=4)) as resp:
        assert resp.status == 200, await resp.text()

    async def idle() -> bool:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
        gauges = re.findall(r"^genai_server_(?:num_requests_\w+|kv_cache_usage_perc)\{[^}]*\} (\S+)$", text, re.M)
        return bool(gauges) and all(float(value) == 0 for value in gauges)

    await eventually_async(idle, timeout=SETTLE_S, what="every gauge back at 0")


async def _long_stream(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """A stream that runs for seconds (it may not stop before 1900 tokens), its first chunk already read."""
    body = chat_body(max_tokens=1900, min_tokens=1900, stream=True)
    resp = await session.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status == 200
    await resp.content.readline()
    return resp


async def test_a_grammar_that_kills_the_engine_fails_only_what_ran_and_cannot_kill_it_twice(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    url = faulty.url
    first = _engine_pids(faulty)[-1]
    liveness = Liveness(session, url)
    running = await _long_stream(session, url)
    killer = chat_body(max_tokens=20, response_format=_marked("FAULT-SEGV"))
    async with session.post(f"{url}/v1/chat/completions", json=killer) as resp:
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
    assert error["param"] == "response_format" and "stopped the engine" in error["message"]
    events = sse_events(await running.text())
    assert json.loads(events[-2])["error"]["code"] == "engine_error", "the stream in flight is told, not cut"
    assert events[-1] == "[DONE]"
    await _still_serves(session, url)
    assert not _alive(first) and len(_engine_pids(faulty)) >= 2
    pids = _engine_pids(faulty)
    async with session.post(f"{url}/v1/chat/completions", json=killer) as again:
        assert again.status == 400, await again.text()
        assert "refused" in (await again.json())["error"]["message"]
    assert _engine_pids(faulty) == pids and _alive(pids[-1]), "refused before it reached the engine"
    await liveness.stop()
    assert liveness.statuses == {200} and liveness.slowest < LIVENESS_BOUND_S


async def test_a_compile_that_holds_the_gil_does_not_stall_the_server(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    url = faulty.url
    liveness = Liveness(session, url)
    body = chat_body(max_tokens=8, response_format=_marked("FAULT-HOLD-GIL"))
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await liveness.stop()
    assert liveness.statuses == {200}
    assert liveness.slowest < LIVENESS_BOUND_S, f"/health/live took {liveness.slowest:.2f} s during the compile"


async def test_a_grammar_that_compiles_past_the_deadline_is_stopped_and_refused(tmp_path: Path) -> None:
    """ENGINE_COMPILE_TIMEOUT=1 and a compile that holds on for seconds: the engine process is stopped, the request
    is the client's 400, a new engine serves, and the same grammar is refused without reaching it."""
    with ServerProcess(tmp_path / "server.log", ENGINE_COMPILE_TIMEOUT="1", PYTHONPATH=_fault_path(tmp_path)) as server:
        server.wait_healthy()
        body = chat_body(max_tokens=8, response_format=_marked("FAULT-HOLD-GIL"))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 400, await resp.text()
                assert "did not compile within 1 s" in (await resp.json())["error"]["message"]
            await _still_serves(session, server.url)
            pids = _engine_pids(server)
            assert len(pids) == 2
            async with session.post(f"{server.url}/v1/chat/completions", json=body) as again:
                assert again.status == 400, await again.text()
            assert _engine_pids(server) == pids


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.M)
    assert match, text
    return int(match.group(1))


async def test_memory_past_the_cap_fails_the_request_and_the_engine_stays_under_it(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    """Heap growth stops at the engine process's data limit: the request whose grammar grew it is refused (400),
    the process lives on, and its peak resident memory never passed the cap."""
    pid = _engine_pids(faulty)[-1]
    body = chat_body(max_tokens=8, response_format=_marked("FAULT-GROW-PRIVATE"))
    async with session.post(f"{faulty.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
    assert error["param"] == "response_format" and "more memory" in error["message"]
    assert _engine_pids(faulty)[-1] == pid
    assert _status_kb(pid, "VmHWM") < MEMORY_CAP_MB * 1024


async def test_memory_the_limit_does_not_see_is_stopped_by_the_server(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    """Shared memory is not in the data limit: the server sees the resident memory pass the cap and stops the
    process; the request is failed and a new engine serves."""
    pid = _engine_pids(faulty)[-1]
    body = chat_body(max_tokens=8, response_format=_marked("FAULT-GROW-SHARED"))
    async with session.post(f"{faulty.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 400, await resp.text()  # it was compiling when the engine was stopped
    await _still_serves(session, faulty.url)
    assert not _alive(pid) and _engine_pids(faulty)[-1] != pid
    assert "over its cap" in faulty.log()


async def test_an_engine_killed_from_outside_fails_what_ran_and_those_who_wait_are_served(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    """As the kernel's OOM killer would: the stream in flight gets an error event, readiness is 503 until a new
    engine runs, and a request sent meanwhile waits for it."""
    url = faulty.url
    pid = _engine_pids(faulty)[-1]
    running = await _long_stream(session, url)
    os.kill(pid, signal.SIGKILL)
    events = sse_events(await running.text())
    assert json.loads(events[-2])["error"]["code"] == "engine_error"
    async with session.get(f"{url}/health/ready") as ready:
        assert ready.status == 503 or _engine_pids(faulty)[-1] != pid  # unless a new engine already runs
    async with session.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=4)) as waited:
        assert waited.status == 200, await waited.text()
    assert _engine_pids(faulty)[-1] != pid


async def test_an_owner_thread_that_dies_fails_what_ran_and_the_engine_restarts(
    session: aiohttp.ClientSession, faulty: ServerProcess
) -> None:
    """A bug of ours on the engine's owner thread (injected) ends its process with status 3: every request it ran
    gets the engine's error, streaming or not, and a new engine serves."""
    url = faulty.url
    pid = _engine_pids(faulty)[-1]
    bodies = [chat_body(max_tokens=1234), chat_body(max_tokens=1234, stream=True)]
    plain, stream = await asyncio.gather(*[session.post(f"{url}/v1/chat/completions", json=b) for b in bodies])
    assert plain.status == 500 and (await plain.json())["error"]["code"] == "engine_error"
    events = sse_events(await stream.text()) if stream.status == 200 else []
    assert stream.status == 500 or json.loads(events[-2])["error"]["code"] == "engine_error"
    await _still_serves(session, url)
    assert _engine_pids(faulty)[-1] != pid
    assert "exited with status 3" in faulty.log()


async def test_an_engine_that_cannot_be_restarted_stops_the_server_with_status_3(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(REPO / "genai_server" / "bundled_model" / "tiny-random-llama-int4", model)
    with ServerProcess(tmp_path / "server.log", MODEL_PATH=str(model)) as server:
        server.wait_healthy()
        (model / "genai_config.json").unlink()  # the next load cannot succeed
        os.kill(_engine_pids(server)[-1], signal.SIGKILL)
        assert await asyncio.to_thread(server.proc.wait, SETTLE_S) == ExitStatus.ENGINE_FAILED
        eventually(lambda: "could not be restarted" in server.log(), timeout=SETTLE_S, what="the reason logged")
