"""The concurrency limit with a bounded wait queue in front of it.

At most MAX_CONCURRENT_REQUESTS generation requests run; up to MAX_QUEUED_REQUESTS more wait their turn in
arrival order, each for at most QUEUE_TIMEOUT seconds; beyond that, a 429 ``rate_limit_exceeded`` with a
``Retry-After`` estimated from the queue. The middleware holds the slot around the whole handler, and a
streaming handler returns only when its stream has ended, so a slot is never freed early. The rejection
happens before the body is read, so before any tokenising or templating.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import web

from genai_server.errors import RateLimited, ShuttingDown
from genai_server.http.endpoints import generates, tokenizes

# How much the running estimate of a request's duration moves with each finished one.
_EWMA_WEIGHT = 0.2


class ConcurrencyLimiter:
    """Slots for generation requests, and a FIFO of requests waiting for one."""

    def __init__(self, limit: int, max_queued: int = 0, queue_timeout_s: float = 0.0) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._mean_hold_s = 1.0  # until measured: about a second, the bundled and small models' scale
        self._admitting = True

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if allowed; ``RateLimited`` when the line is full or too slow,
        ``ShuttingDown`` once the server drains."""
        if not self._admitting:
            raise ShuttingDown("The server is shutting down; send this request to another instance")
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise self._refusal("Too many requests in flight and waiting")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except TimeoutError:
            if not waiter.done():
                self._waiters.remove(waiter)
                raise self._refusal(f"Waited {self.queue_timeout_s:g} s in the queue without a free slot") from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def stop_admitting(self) -> None:
        """The drain began: new requests are refused; those running or in line carry on."""
        self._admitting = False

    def close(self) -> None:
        """The drain is over: everyone still in line is told the server is shutting down."""
        self._admitting = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ShuttingDown("The server shut down before this request could start"))

    def release(self, held_s: float) -> None:
        """Give a slot back: to the first in line, or to the pool."""
        self._mean_hold_s += _EWMA_WEIGHT * (held_s - self._mean_hold_s)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1

    def retry_after_s(self) -> int:
        """When a slot is likely to be free for a new request: the line ahead of it, at the measured pace."""
        return max(1, math.ceil(self._mean_hold_s * (self.queued + 1) / self.limit))

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for requests in flight or waiting."""
        capacity = self.limit + self.max_queued
        remaining = max(0, capacity - self.in_flight - self.queued)
        return {
            "x-ratelimit-limit-requests": str(capacity),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{self.retry_after_s() if remaining == 0 else 0}s",
        }

    def _refusal(self, reason: str) -> RateLimited:
        retry = self.retry_after_s()
        return RateLimited(
            f"{reason} (limit {self.limit} running, {self.max_queued} waiting); retry after {retry} s",
            headers={"Retry-After": str(retry), **self.headers()},
        )

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        """A waiting client went away: leave the line, or hand back a slot it was just given."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release(self._mean_hold_s)


def setup_concurrency_limit(
    app: web.Application, limiter: ConcurrencyLimiter, tokenizing: ConcurrencyLimiter | None = None
) -> None:
    """Add the middleware that enforces ``limiter`` on generation routes (listing models, health and metrics never
    wait or count), and its headers on their responses; and ``tokenizing`` on the routes that only tokenize
    (``/tokenize``, ``count_tokens``): a flood of them must not queue ahead of prompts on the engine's tokenizer,
    nor wait behind generations for a slot."""

    @web.middleware
    async def concurrency_limit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        gate = limiter if generates(request) else tokenizing if tokenizes(request) else None
        if gate is None:
            return await handler(request)
        await gate.acquire()
        started = asyncio.get_running_loop().time()
        try:
            return await handler(request)
        finally:
            gate.release(asyncio.get_running_loop().time() - started)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        if generates(request) and response.status != 429:
            response.headers.update(limiter.headers())

    app.middlewares.append(concurrency_limit)
    app.on_response_prepare.append(add_headers)
