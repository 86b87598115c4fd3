"""The real server (``create_app``) plus a loop-lateness probe, run as its own process by ``run.py``.

The probe is benchmark-only: a task on the server's event loop sleeps 5 ms at a
time and records how late it wakes; ``GET /_bench/loop`` returns the percentiles
since the last call and starts a new window. Everything else is the server as users run it.

    python benchmarks/bench_server.py [server flags...]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genai_server.app import create_app
from genai_server.logs import setup_logging
from genai_server.settings import load_settings

LATENESS = web.AppKey("lateness", list[float])
_TICK_S = 0.005


async def lateness_probe(app: web.Application) -> AsyncIterator[None]:
    """Sample how late a 5 ms sleep wakes, for as long as the server runs."""
    samples: list[float] = []
    app[LATENESS] = samples

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_TICK_S)
            samples.append((loop.time() - before - _TICK_S) * 1000)

    task = asyncio.create_task(sample())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def loop_stats(request: web.Request) -> web.Response:
    """Lateness percentiles (ms) since the last call; the window restarts."""
    window: list[float] = request.app[LATENESS]
    samples = sorted(window)
    window.clear()
    if not samples:
        return web.json_response({"samples": 0})

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return web.json_response({"samples": len(samples), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": samples[-1]})


def main() -> None:
    settings = load_settings(sys.argv[1:])
    setup_logging("WARNING", settings.log_format)
    app = create_app(settings)
    app.cleanup_ctx.append(lateness_probe)
    app.router.add_get("/_bench/loop", loop_stats)
    web.run_app(app, host=settings.server_host, port=settings.server_port, print=None, access_log=None)


if __name__ == "__main__":
    main()
