"""The NVML sampler against the real library: here (no driver) it must stay off, silently and cheaply."""

from __future__ import annotations

import logging
from typing import Any

import pynvml
import pytest

from genai_server.telemetry.gpu import GpuMonitor
from tests.harness.bodies import chat_body


def _driver_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_driver_present(), reason="this machine has an NVIDIA driver: the no-driver path is not here")
async def test_without_a_driver_the_monitor_is_off_and_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monitor = GpuMonitor()
    assert not monitor.enabled
    assert monitor.used_mb() is None
    assert monitor.open_window() is None
    monitor.close_window(None)
    await monitor.start()
    await monitor.stop()
    assert not [r for r in caplog.records if r.name == "genai_server.telemetry.gpu"]  # nothing above debug


@pytest.mark.skipif(not _driver_present(), reason="needs an NVIDIA driver and GPU")
async def test_with_a_gpu_the_window_reports_memory() -> None:
    monitor = GpuMonitor()
    await monitor.start()
    window = monitor.open_window()
    assert window is not None and window.used_start_mb > 0
    monitor.close_window(window)
    assert window.peak_mb >= window.used_start_mb
    await monitor.stop()


@pytest.mark.skipif(_driver_present(), reason="this machine has an NVIDIA driver")
async def test_gpu_fields_are_null_in_responses_without_a_gpu(client: Any) -> None:
    body = await (await client.post("/v1/chat/completions", json=chat_body())).json()
    gpu = {k: v for k, v in body["metrics"].items() if k.startswith("gpu_")}
    assert gpu == {
        "gpu_memory_used_start_mb": None,
        "gpu_memory_peak_mb": None,
        "gpu_memory_delta_mb": None,
        "gpu_process_memory_mb": None,
    }
    metrics = await (await client.get("/metrics")).text()
    assert "genai_server_gpu_memory_used_bytes" not in metrics
