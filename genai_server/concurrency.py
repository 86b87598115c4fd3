"""The concurrency limit: at most N generation requests in flight, the next gets an immediate 429.

The slot is held by the middleware around the whole handler, and a streaming
handler returns only when its stream has ended, so a slot is never freed early.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from genai_server.errors import RateLimited

# Only these routes generate tokens; listing models or health never waits or counts.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# A generation on the bundled and small models takes about a second; a client retrying
# sooner would most likely be refused again.
RETRY_AFTER_S = 1


class ConcurrencyLimiter:
    """Counts generation requests in flight against a fixed limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1


def setup_concurrency_limit(app: web.Application, limiter: ConcurrencyLimiter) -> None:
    """Add the middleware that enforces ``limiter`` on generation routes."""

    @web.middleware
    async def concurrency_limit(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path not in GENERATION_PATHS or request.method != "POST":
            return await handler(request)
        if not limiter.try_acquire():
            raise RateLimited(
                f"Too many requests in flight (limit {limiter.limit}); retry after {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await handler(request)
        finally:
            limiter.release()

    app.middlewares.append(concurrency_limit)
