"""A request's time to first token, predicted at its arrival from the work ahead of it and the rate that work has
been measured to go at: what SLO admission (``http/slo_admission.py``) refuses a request by.

The work is prompt bytes, a proxy for prompt tokens that is known before anything is tokenized (and for every
backend, an upstream's included). The work ahead of a request is the prompt bytes of every request that arrived
before it and has no first token yet: those waiting for a slot and those being prefilled. Each request, when its
first token comes, is one measurement of the rate: (the work that was ahead of it + its own) / its TTFT. That rate
is measured under the load the server really has, so it counts what slows prefill there (decoding beside it,
batching, a slot queue), and it follows the load as it changes (an exponentially weighted mean).

A request with nothing ahead of it is never predicted to miss: its own prefill is as fast as the server gets, and
admitting it keeps the measurement fresh after a burst (a rate measured under load, never measured again, would
refuse an idle server's requests for ever).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# How much each measurement moves the rate.
_EWMA_WEIGHT = 0.2
# Measurements before a prediction is trusted: until then, every request is admitted.
MIN_MEASUREMENTS = 3


@dataclass
class _Pending:
    work: float  # its prompt's bytes
    ahead: float  # the work ahead of it when it arrived
    started: Callable[[], bool]  # whether its first token has come


@dataclass(frozen=True)
class Prediction:
    """A request's predicted wait (for the work ahead of it) and TTFT (that wait and its own prefill), seconds."""

    wait_s: float
    ttft_s: float

    @property
    def retry_after_s(self) -> int:
        """When the work ahead will have gone through: when to try again (at least a second)."""
        return max(1, math.ceil(self.wait_s))


class TtftForecast:
    """The requests of one model that have no first token yet, and the rate work goes at."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._rate: float | None = None  # prompt bytes per second, arrival to first token
        self.measurements = 0

    @property
    def rate(self) -> float | None:
        """Prompt bytes per second from arrival to first token, as measured so far (None before the first)."""
        return self._rate

    def predict(self, work: float) -> Prediction | None:
        """The wait and TTFT of a request of ``work`` bytes arriving now; None when there is nothing to go by (too
        few measurements) or nothing ahead of it."""
        ahead = self._ahead()
        if self._rate is None or self.measurements < MIN_MEASUREMENTS or ahead == 0:
            return None
        return Prediction(wait_s=ahead / self._rate, ttft_s=(ahead + work) / self._rate)

    def arrive(self, work: float, started: Callable[[], bool]) -> int:
        """A request of ``work`` bytes is admitted; ``started`` says when its first token has come. Its ticket."""
        ticket, self._next = self._next, self._next + 1
        self._pending[ticket] = _Pending(work, self._ahead(), started)
        return ticket

    def finish(self, ticket: int, ttft_s: float | None) -> None:
        """The request has ended; ``ttft_s`` its time to first token, None if it had none (refused, failed)."""
        pending = self._pending.pop(ticket, None)
        if pending is None or ttft_s is None or ttft_s <= 0:
            return
        rate = (pending.ahead + pending.work) / ttft_s
        self._rate = rate if self._rate is None else self._rate + _EWMA_WEIGHT * (rate - self._rate)
        self.measurements += 1

    def _ahead(self) -> float:
        """The work of the requests with no first token yet."""
        return sum(p.work for p in self._pending.values() if not p.started())
