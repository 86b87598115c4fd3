"""A request's time to first token, predicted at its arrival from the work ahead of it and the rate that work has
been measured to go at: what SLO admission (``http/slo_admission.py``) refuses a request by.

The work is prompt bytes, a proxy for prompt tokens that is known before anything is tokenized (and for every
backend, an upstream's included). The work ahead of a request is the prompt bytes of every request that arrived
before it and has no first token yet: those waiting for a slot and those being prefilled. Each first token is one
measurement of the rate: (the work that was ahead of its request + the request's own) / its TTFT. That rate is
measured under the load the server really has, so it counts what slows prefill there (decoding beside it, batching,
a slot queue), and it follows the load as it changes (an exponentially weighted mean).

A request with nothing ahead of it is never predicted to miss: its own prefill is as fast as the server gets, and
admitting it keeps the measurement fresh after a burst (a rate measured under load, never measured again, would
refuse an idle server's requests for ever).

Every step is O(1): the work ahead is a running sum, updated when a request arrives, gets its first token (the
request's clock calls ``Ticket.first_token``) or ends without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How much each measurement moves the rate.
_EWMA_WEIGHT = 0.2
# Measurements before a prediction is trusted: until then, every request is admitted.
MIN_MEASUREMENTS = 3


@dataclass(frozen=True)
class Prediction:
    """A request's predicted wait (for the work ahead of it) and TTFT (that wait and its own prefill), seconds."""

    wait_s: float
    ttft_s: float

    @property
    def retry_after_s(self) -> int:
        """When the work ahead will have gone through: when to try again (at least a second)."""
        return max(1, math.ceil(self.wait_s))


class Ticket:
    """One admitted request, until its first token or its end."""

    def __init__(self, forecast: TtftForecast, work: int, ahead: int, arrival: float) -> None:
        self._forecast = forecast
        self.work = work  # its prompt's bytes
        self.ahead = ahead  # the work ahead of it when it arrived
        self.arrival = arrival  # perf_counter() time its clock started
        self.waiting = True  # no first token yet

    def first_token(self, at: float) -> None:
        """Its first token came at ``at`` (perf_counter): it no longer waits, and its TTFT is a measurement."""
        self._forecast.started(self, at)


class TtftForecast:
    """The work of one model's requests that have no first token yet, and the rate work goes at."""

    def __init__(self) -> None:
        self._waiting_work = 0  # bytes
        self._rate: float | None = None  # prompt bytes per second, arrival to first token
        self.measurements = 0

    @property
    def rate(self) -> float | None:
        """Prompt bytes per second from arrival to first token, as measured so far (None before the first)."""
        return self._rate

    def predict(self, work: int) -> Prediction | None:
        """The wait and TTFT of a request of ``work`` bytes arriving now; None when there is nothing to go by (too
        few measurements) or nothing ahead of it."""
        ahead = self._waiting_work
        if self._rate is None or self.measurements < MIN_MEASUREMENTS or ahead == 0:
            return None
        return Prediction(wait_s=ahead / self._rate, ttft_s=(ahead + work) / self._rate)

    def arrive(self, work: int, arrival: float) -> Ticket:
        """A request of ``work`` bytes, whose clock started at ``arrival``, is admitted: its ticket."""
        ticket = Ticket(self, work, self._waiting_work, arrival)
        self._waiting_work += work
        return ticket

    def started(self, ticket: Ticket, at: float) -> None:
        """``ticket``'s first token came at ``at``: one measurement of the rate (once per ticket)."""
        if not self._stop_waiting(ticket):
            return
        ttft_s = at - ticket.arrival
        if ttft_s > 0:
            rate = (ticket.ahead + ticket.work) / ttft_s
            self._rate = rate if self._rate is None else self._rate + _EWMA_WEIGHT * (rate - self._rate)
            self.measurements += 1

    def finish(self, ticket: Ticket) -> None:
        """The request has ended (with or without a first token: refused later, failed, cancelled)."""
        self._stop_waiting(ticket)

    def _stop_waiting(self, ticket: Ticket) -> bool:
        if not ticket.waiting:
            return False
        ticket.waiting = False
        self._waiting_work -= ticket.work
        return True
