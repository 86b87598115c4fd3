"""The finished-request record: one immutable account of a request once it has ended, built once and handed to every
sink (the access log, Prometheus, the span) so that they cannot disagree.

It is built by the HTTP layer's outermost middleware from what the request turned out to be; the figures in it were
computed once, when the serving layer stopped the request's clock. Its fields speak HTTP (method, path, status), but
nothing here knows of the web app.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from genai_server.protocol import RequestMetrics

# nginx's code for a request whose client went away before the answer was complete.
CLIENT_CLOSED_REQUEST = 499
# The model label of requests that never reached a backend (refused by the limit, invalid, unknown model): the
# requested id is not trusted as a label, or any client could grow the series without bound.
NO_MODEL = "-"


@dataclass(frozen=True)
class Moments:
    """When things happened to a request, in ``time.perf_counter()`` seconds (None: it never happened)."""

    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """One finished request."""

    request_id: str
    method: str
    path: str
    status: int  # the status it really ended with: 499 for a client that left, an error's for a failed stream
    duration_s: float  # arrival to the end of the response
    moments: Moments
    backend: str  # the backend that took it, or the server's default one (what its provider label names)
    # gen_ai.operation.name ("chat", "text_completion") for a generation request; None for any other route.
    operation: str | None = None
    model: str | None = None  # the configured model that took it; None when no backend did
    requested_model: str | None = None  # what the client asked for (the log only: never a metrics label)
    replica: str | None = None  # the upstream replica that served it
    error_code: str | None = None
    error_param: str | None = None
    # The request's figures, computed once when its clock ended; None when generation never started.
    figures: RequestMetrics | None = None
    itl_s: tuple[float, ...] = ()
    # gen_ai.request.* attributes, read from the parsed request (max_tokens whichever name the client used).
    request_attributes: dict[str, int | float] = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        """Whether it was a generation request (a generation route, with its method)."""
        return self.operation is not None

    @property
    def client_disconnected(self) -> bool:
        """Whether the client went away before the answer was complete."""
        return self.status == CLIENT_CLOSED_REQUEST

    @property
    def model_label(self) -> str:
        """The model as a metrics label: a configured id, or ``-``."""
        return self.model or NO_MODEL
