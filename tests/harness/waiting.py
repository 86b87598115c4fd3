"""Waiting for something to happen: poll the observable until it holds, never sleep a fixed time and hope.

A fixed ``sleep`` before an assertion is a guess at how long the server takes; on a loaded 2-core box the guess is
sometimes short and the test flakes. ``eventually`` asks again until the answer is there, so it is as quick as the
server on a fast box and as patient as needed on a slow one; its limit is generous and only turns a hang into a
failure that says what never happened.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")
# What was awaited, for the failure message: words, or a function that says it with the state at the time of failure.
Description = str | Callable[[], str] | None

# Generous: only a hang takes this long. A caller whose wait is known to be longer (a model loading) passes its own.
TIMEOUT_S = 30.0
INTERVAL_S = 0.02


def eventually(
    predicate: Callable[[], T | None],
    *,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: Description = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that (so a caller can use what it read;
    typed without ``None``, which is never returned).

    An exception from ``predicate`` is not retried: it fails at once, as an assertion in it should (a process that
    died will not come back). Past ``timeout`` seconds, an ``AssertionError`` names what was awaited (``what``, or by
    default the predicate's source) and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_never(predicate, what, timeout, value))
        time.sleep(interval)


@overload
async def eventually_async(
    predicate: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: Description = None,
) -> T: ...


@overload
async def eventually_async(
    predicate: Callable[[], T | None],
    *,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: Description = None,
) -> T: ...


async def eventually_async(
    predicate: Callable[[], object],
    *,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: Description = None,
) -> object:
    """``eventually`` for a test on the event loop: ``predicate`` may be a coroutine function (it reads /metrics) or a
    plain one (it reads an app's state), and the loop keeps running between tries, so the server under test, when it
    runs on the same loop, gets on with what the test waits for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(_never(predicate, what, timeout, value))
        await asyncio.sleep(interval)


def _never(predicate: Callable[[], object], what: Description, timeout: float, last: object) -> str:
    awaited = what() if callable(what) else what or _source(predicate)
    return f"timed out after {timeout:g} s waiting for: {awaited} (last seen: {last!r})"


def _source(predicate: Callable[[], object]) -> str:
    """The predicate as written (a lambda's line), which says what was awaited better than its repr."""
    try:
        return " ".join(inspect.getsource(predicate).split())
    except (OSError, TypeError):
        return repr(predicate)
