"""``/health/live`` polled while a test's hostile request runs: how slow its slowest answer was, and every status.

The server's event loop is what a stall freezes (a compile holding the GIL, a decompression bomb), and liveness is
what an orchestrator sees of it: so a test asserts on the slowest probe, with a generous bound that still catches
a stall of seconds.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

# Generous: a loaded CI box answers in milliseconds; the stalls this catches lasted 2.7 to 16 s.
LIVENESS_BOUND_S = 1.0


class Liveness:
    """Polls ``/health/live`` back to back from creation until ``stop()``."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.slowest = 0.0
        self.statuses: set[int] = set()
        self._answered = asyncio.Event()  # one probe at least has come back: the figures say something
        self._task = asyncio.create_task(self._poll(session, url))

    async def _poll(self, session: aiohttp.ClientSession, url: str) -> None:
        while True:
            started = time.monotonic()
            async with session.get(f"{url}/health/live") as resp:
                self.statuses.add(resp.status)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self._answered.set()

    async def stop(self) -> None:
        """Stop polling, once at least one probe has answered (a hostile request may end before the first did)."""
        await asyncio.wait_for(self._answered.wait(), LIVENESS_BOUND_S * 30)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
