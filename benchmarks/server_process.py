"""Starting a server process for a benchmark, waiting until it answers, and reading its memory.

These were first written inside run.py and proxy_overhead.py, and every other benchmark that needed a server
imported them from there, which tied the scripts into a circle (run.py also imports the scripts that imported it).
They live here, importing no benchmark, so that any script can use them and the imports point one way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, so that several servers of one run never ask for the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` and its children (the server's engine process) in MiB: VmRSS now, or
    VmHWM, each one's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            own = int(line.split()[1]) / 1024
            return own + sum(memory_mb(child, field) for child in _children(pid))
    raise RuntimeError(f"no {field}")


def reset_peak_memory(pid: int) -> None:
    """Start the peak (VmHWM) of ``pid`` and its children afresh: writing 5 to clear_refs sets it to the current
    resident memory, so that ``memory_mb(pid, "VmHWM")`` then says the peak of what follows."""
    for each in (pid, *_children(pid)):
        with contextlib.suppress(OSError):  # a child that has just ended
            Path(f"/proc/{each}/clear_refs").write_text("5")


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started that still run."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# The server's settings are read from variables with these prefixes (genai_server/settings.py; a test keeps the list
# whole): left out of the caller's environment, so that only what the benchmark passes configures a server.
SETTING_PREFIXES = (
    "MODEL",
    "BACKEND",
    "UPSTREAM",
    "SERVER_",
    "MAX_",
    "QUEUE_",
    "REQUEST_",
    "CLIENT_",
    "KEEPALIVE_",
    "SHUTDOWN_",
    "ENGINE_",
    "PREFIX_CACHE_",
    "STREAM_",
    "RESPONSES_",
    "UI",
    "API_KEYS",
    "ADMIN_API_KEYS",
    "METRICS_",
    "CORS_",
    "ALLOWED_HOSTS",
    "SLO_",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "LOG_",
)


def start(*args: str, cwd: Path = REPO, output: int | None = None, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m genai_server`` (of the checkout ``cwd``) with these flags and settings, on a free port; the
    caller's own server settings are left out. ``output``: where its stdout and stderr go (``subprocess.DEVNULL``
    to silence it; None: this process's)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genai_server", "--server-port", str(port), "--log-level", "WARNING", *args],
        cwd=cwd,
        env={**clean, **env},
        stdout=output,
        stderr=output,
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 120
) -> None:
    """Poll ``url``/health until it answers 200 (up to ``timeout_s``): a measurement must not time the start-up. With
    ``proc``, a server that exits fails at once instead of at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(url)
