"""The trace headers a relayed request sends upstream, for the request being handled: set by the tracing middleware
(``tracing.py``), read by the upstream client (``backends/upstream_client.py``), which knows nothing of the web
app."""

from __future__ import annotations

from contextvars import ContextVar

upstream_trace_headers: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("upstream_trace_headers", default=())
