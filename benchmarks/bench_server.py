"""The real server (``create_app``) plus a loop-lateness probe, run as its own process by ``run.py``.

The probe is benchmark-only: while a window is open (``POST /_bench/loop``) a task on the server's event loop
sleeps 5 ms at a time and records how late it wakes; ``GET /_bench/loop`` closes the window and returns the
percentiles. Everything else is the server as users run it.

    python benchmarks/bench_server.py [server flags...]
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genai_server.app import create_app
from genai_server.logs import setup_logging
from genai_server.settings import load_settings

_TICK_S = 0.005


class LatenessProbe:
    """Samples how late a 5 ms sleep wakes, only while a window is open: each wake-up takes a core from the
    engine, so a probe left running would slow the figures measured outside its window."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        self.close()
        self.samples = []
        self._task = asyncio.create_task(self._sample())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_TICK_S)
            self.samples.append((loop.time() - before - _TICK_S) * 1000)


PROBE = web.AppKey("lateness_probe", LatenessProbe)


async def lateness_probe(app: web.Application) -> AsyncIterator[None]:
    app[PROBE] = LatenessProbe()
    yield
    app[PROBE].close()


async def open_window(request: web.Request) -> web.Response:
    """Start sampling."""
    request.app[PROBE].open()
    return web.json_response({"sampling": True})


async def loop_stats(request: web.Request) -> web.Response:
    """Lateness percentiles (ms) of the window opened last; sampling stops."""
    probe = request.app[PROBE]
    probe.close()
    samples: list[float] = sorted(probe.samples)
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
    app.router.add_post("/_bench/loop", open_window)
    app.router.add_get("/_bench/loop", loop_stats)
    web.run_app(app, host=settings.server_host, port=settings.server_port, print=None, access_log=None)


if __name__ == "__main__":
    main()
