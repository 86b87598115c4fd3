"""GPU memory through NVML (``nvidia-ml-py``): device memory at the start of each request, its peak sampled
while the request runs, and the server process's own GPU memory where the driver reports it.

Without the library or a driver (every CPU box) the monitor is off: one failed ``nvmlInit`` at start-up,
then every figure is ``None``, no sampling task runs and nothing is logged above debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_SAMPLE_INTERVAL_S = 0.05
_MIB = 1024 * 1024


@dataclass
class GpuWindow:
    """One request's view of GPU memory, in MiB."""

    used_start_mb: float
    peak_mb: float
    process_mb: float | None = None

    @property
    def delta_mb(self) -> float:
        """How far the peak rose above the start."""
        return self.peak_mb - self.used_start_mb


class GpuMonitor:
    """Samples the memory of every visible GPU while requests run."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._windows: set[int] = set()
        self._open: dict[int, GpuWindow] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        try:
            import pynvml
        except ImportError:
            log.debug("GPU telemetry off: nvidia-ml-py is not installed")
            return
        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except pynvml.NVMLError as exc:  # no driver, no GPU: no GPU telemetry on this machine
            log.debug("GPU telemetry off: %s", exc)

    @property
    def enabled(self) -> bool:
        """Whether NVML answered and at least one GPU is visible."""
        return bool(self._handles)

    def used_mb(self) -> float | None:
        """Memory in use on all visible GPUs now."""
        if not self.enabled:
            return None
        return float(sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)) / _MIB

    def process_mb(self) -> float | None:
        """This process's GPU memory, if the driver reports per-process figures."""
        if not self.enabled:
            return None
        total = 0
        for handle in self._handles:
            with contextlib.suppress(self._nvml.NVMLError):
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                        total += proc.usedGpuMemory
        return total / _MIB if total else None

    def open_window(self) -> GpuWindow | None:
        """Start watching for one request."""
        used = self.used_mb()
        if used is None:
            return None
        window = GpuWindow(used_start_mb=used, peak_mb=used)
        self._open[id(window)] = window
        self._wake.set()
        return window

    def close_window(self, window: GpuWindow | None) -> None:
        """Stop watching: one last sample, and the process's own figure."""
        if window is None:
            return
        self._open.pop(id(window), None)
        used = self.used_mb()
        if used is not None:
            window.peak_mb = max(window.peak_mb, used)
        window.process_mb = self.process_mb()

    async def run(self) -> None:
        """Sample every 50 ms while any window is open; sleep otherwise."""
        while True:
            if not self._open:
                self._wake.clear()
                await self._wake.wait()
            used = self.used_mb()
            if used is not None:
                for window in self._open.values():
                    window.peak_mb = max(window.peak_mb, used)
            await asyncio.sleep(_SAMPLE_INTERVAL_S)

    async def start(self) -> None:
        """Start the sampler (only where a GPU answered)."""
        if self.enabled:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop the sampler and shut NVML down."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.enabled:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
