"""Per-request telemetry, measured by the server's own clock the same way for every backend.

Engines measure differently, so their own numbers cannot be compared; these can.
All times are ``time.perf_counter()`` seconds of this process. Field names follow
vLLM's per-request ``metrics`` where it has one.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genai_server.protocol import Performance, RequestMetrics
from genai_server.telemetry.gpu import GpuMonitor, GpuWindow


@dataclass
class RequestTelemetry:
    """The clock marks of one generation request; filled in by the serving layer as it runs."""

    arrival: float = field(default_factory=time.perf_counter)
    model: str | None = None
    backend: str | None = None
    replica: str | None = None  # which replica of an upstream served it (its URL without credentials)
    prompt_tokens: int = 0
    # Prompt tokens whose KV cache was reused rather than prefilled; None where the backend does not say.
    cached_prompt_tokens: int | None = None
    completion_tokens: int = 0
    admitted: float | None = None
    first_token: float | None = None
    end: float | None = None
    backend_reported: dict[str, object] | None = None
    gpu: GpuWindow | None = None
    _gpu_monitor: GpuMonitor | None = None
    itl_s: list[float] = field(default_factory=list)
    # Told the first token's time (perf_counter) when it comes: the request's TTFT forecast (SLO admission).
    on_first_token: Callable[[float], None] | None = field(default=None, repr=False)
    _last_token: float | None = None
    _final: RequestMetrics | None = None  # the figures, computed once when the clock ended

    def watch_gpu(self, monitor: GpuMonitor) -> None:
        """Sample GPU memory from now until ``finish``."""
        self._gpu_monitor, self.gpu = monitor, monitor.open_window()

    def on_admitted(self, at: float) -> None:
        """Generation started (the end of queueing); the earliest of several sequences counts."""
        if self.admitted is None or at < self.admitted:
            self.admitted = at

    def on_tokens(self, count: int, at: float | None = None) -> None:
        """``count`` tokens arrived together; each after the first contributes an inter-token latency."""
        now = time.perf_counter() if at is None else at
        if count <= 0 or self.end is not None:  # after the clock stopped (an upstream's chunk past its usage)
            return
        self.completion_tokens += count
        if self._last_token is None:
            self.first_token = now
            count -= 1
            if self.on_first_token is not None:
                self.on_first_token(now)
        elif count:
            self.itl_s.extend([(now - self._last_token) / count] * count)
        self._last_token = now

    def on_retry(self) -> None:
        """The attempt failed before anything reached the client and another replica takes the request: its
        generation figures start again; arrival and queueing stand (the client waited through both)."""
        self._close_gpu_window()  # the failed attempt's, before the new one opens
        self.first_token = self._last_token = None
        self.completion_tokens = 0
        self.itl_s.clear()
        self.backend_reported = None
        if self._gpu_monitor is not None:
            self.gpu = self._gpu_monitor.open_window()

    def finish(self) -> None:
        """The request's generation is over (finished, failed or cancelled): the clock stops and the figures are
        computed, once. Only the serving layer calls it, around the backend's answer."""
        if self.end is not None:
            return
        self.end = time.perf_counter()
        self._close_gpu_window()
        self._final = RequestMetrics(**self._figures())

    @property
    def finished(self) -> bool:
        """Whether the clock has stopped."""
        return self.end is not None

    def _close_gpu_window(self) -> None:
        if self._gpu_monitor is not None:
            self._gpu_monitor.close_window(self.gpu)

    @property
    def inference_time_ms(self) -> float | None:
        """Start of generation to its end."""
        if self.end is None:
            return None
        return (self.end - (self.admitted if self.admitted is not None else self.arrival)) * 1000

    def metrics(self) -> RequestMetrics:
        """The figures: final once the clock has stopped (computed then, once), else so far."""
        return self._final if self._final is not None else RequestMetrics(**self._figures())

    def performance(self) -> Performance:
        """The same figures with ``latency_ms`` and ``peak_memory_mb`` added."""
        figures = self.metrics()
        return Performance(
            **figures.model_dump(), latency_ms=figures.e2e_latency_ms, peak_memory_mb=figures.peak_rss_mb
        )

    def _figures(self) -> dict[str, object]:
        end = self.end if self.end is not None else time.perf_counter()
        e2e = end - self.arrival
        ttft = None if self.first_token is None else self.first_token - self.arrival
        generation = self.inference_time_ms
        n = self.completion_tokens
        itl = sorted(self.itl_s)
        return {
            "queue_time_ms": _ms(None if self.admitted is None else self.admitted - self.arrival),
            "time_to_first_token_ms": _ms(ttft),
            "time_per_output_token_ms": _ms(None if ttft is None or n < 2 else (e2e - ttft) / (n - 1)),
            "mean_itl_ms": _ms(statistics.fmean(itl) if itl else None),
            "itl_p50_ms": _ms(_quantile(itl, 0.5)),
            "itl_p95_ms": _ms(_quantile(itl, 0.95)),
            "generation_time_ms": None if generation is None else round(generation, 3),
            "e2e_latency_ms": _ms(e2e),
            "tokens_per_second": None if not generation else round(n / (generation / 1000), 3),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": n,
            "peak_rss_mb": peak_rss_mb(),
            "backend_reported": self.backend_reported,
            **self._gpu_figures(),
        }

    def _gpu_figures(self) -> dict[str, float | None]:
        gpu = self.gpu
        if gpu is None:
            return {}
        return {
            "gpu_memory_used_start_mb": round(gpu.used_start_mb, 1),
            "gpu_memory_peak_mb": round(gpu.peak_mb, 1),
            "gpu_memory_delta_mb": round(gpu.delta_mb, 1),
            "gpu_process_memory_mb": None if gpu.process_mb is None else round(gpu.process_mb, 1),
        }


def peak_rss_mb() -> float:
    """The peak resident memory so far of the server process (ru_maxrss is KiB on Linux) and of the processes it
    runs (its engine processes): what the box gives the whole server."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((own + sum(_peak_kib(child) for child in _children())) / 1024, 1)


def _children() -> list[str]:
    pid = os.getpid()
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # not Linux: the server's own figure
        return []


def _peak_kib(pid: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just ended
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
