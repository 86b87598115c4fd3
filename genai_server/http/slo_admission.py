"""Middleware: admission by time-to-first-token objective. A generation request whose predicted TTFT (the work ahead
of it and its own prefill, ``telemetry/ttft_forecast.py``) already exceeds its objective is refused at once, with a
429 ``slo_unattainable`` and a ``Retry-After`` of when the work ahead will have gone through, instead of queueing
to fail slowly while it delays the requests behind it.

The objective is the request's ``x-slo-ttft-ms`` header (as inference-perf sends it), else ``SLO_TTFT_MS``; with
neither, nothing is refused. Every generation request is measured all the same, so that a header can be judged the
moment it comes. It runs after the body is read (its size is the request's work) and before the concurrency slot:
a refused request never waits in line.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from genai_server.errors import InvalidRequest, SloUnattainable
from genai_server.http.app_keys import SERVING
from genai_server.http.endpoints import generates
from genai_server.http.request_state import ARRIVAL, BODY, SLO_TICKET
from genai_server.telemetry.ttft_forecast import TtftForecast

SLO_TTFT_HEADER = "x-slo-ttft-ms"
# An objective beyond a day is no objective: refused as a bad header rather than computed with.
_MOST_MS = 86_400_000.0


def setup_slo_admission(app: web.Application, objective_ms: float | None, *, refuse: bool = True) -> None:
    """Add the middleware: ``objective_ms`` is SLO_TTFT_MS (None: only a request's header sets one); ``refuse``
    false (SLO_ADMISSION=false): objectives only count goodput, nothing is refused."""
    forecasts: dict[str, TtftForecast] = {}

    @web.middleware
    async def slo_admission(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        forecast = _forecast(request, forecasts) if generates(request) else None
        if forecast is None:
            return await handler(request)
        work = len(await request.read())  # already read and kept by the request-body middleware
        objective = _objective_ms(request, objective_ms)
        prediction = forecast.predict(work)
        if refuse and objective is not None and prediction is not None and prediction.ttft_s * 1000 > objective:
            retry = prediction.retry_after_s
            raise SloUnattainable(
                f"The time-to-first-token objective of {objective:g} ms cannot be met: with the work ahead, the "
                f"first token is predicted after {prediction.ttft_s * 1000:.0f} ms; retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        ticket = request[SLO_TICKET] = forecast.arrive(work, request[ARRIVAL])  # its clock calls it back
        try:
            return await handler(request)
        finally:
            forecast.finish(ticket)

    app.middlewares.append(slo_admission)


def _forecast(request: web.Request, forecasts: dict[str, TtftForecast]) -> TtftForecast | None:
    """The forecast of the model the request asks for: one per model the server serves (a name it does not serve
    gets none, so that clients cannot grow the table)."""
    serving = request.app.get(SERVING)
    if serving is None:
        return None
    model = request[BODY].get("model") or serving.default_model
    if not isinstance(model, str) or model not in serving.backends:
        return None
    return forecasts.setdefault(model, TtftForecast())


def _objective_ms(request: web.Request, default_ms: float | None) -> float | None:
    given = request.headers.get(SLO_TTFT_HEADER)
    if given is None:
        return default_ms
    try:
        value = float(given)
    except ValueError:
        value = math.nan
    if not 0 < value <= _MOST_MS:  # NaN fails too
        raise InvalidRequest(
            f"The {SLO_TTFT_HEADER} header must be a number of milliseconds above 0 and at most {_MOST_MS:g}",
            param=SLO_TTFT_HEADER,
            code="invalid_header",
        )
    return value
