"""What a backend reports of its own load, read at scrape time by the gauges and the per-replica series.

Plain data, so that telemetry reads every backend the same way and never needs to know which kind it is (and
never imports a backend: backends sit above telemetry and fill these in).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ReplicaLoad:
    """One upstream replica as the gateway sees it."""

    name: str  # its URL without credentials: a metrics label and a log field
    in_flight: int  # requests this gateway has on it now
    healthy: bool  # admitted (True) or ejected by a failed probe or connection
    requests: int  # requests sent to it, second attempts included
    errors: int  # requests it failed before any token reached the client
    prefix_hits: int = 0  # requests sent to it because it served their conversation's prefix (cache_aware)
    prefix_passed_over: int = 0  # such requests sent elsewhere because it was overloaded


@dataclass(frozen=True, kw_only=True)
class Residency:
    """A model loaded on demand (MODELS_DIR): whether it is in memory now, and its loads and unloads so far."""

    loaded: bool
    loads: int
    unloads: int
    load_seconds: float | None  # how long its last load took


@dataclass(frozen=True, kw_only=True)
class BackendLoad:
    """One backend's load now."""

    waiting: int = 0  # sequences accepted and not yet generating (vLLM's meaning of "waiting")
    kv_cache_usage: float | None = None  # the share of its KV-cache budget in use; None where it holds none here
    replicas: tuple[ReplicaLoad, ...] = ()  # the upstream replicas it relays to; none for an embedded engine
    residency: Residency | None = None  # a model loaded on demand; None for one loaded at start-up
