"""Starting a server process for a benchmark, waiting until it answers, and reading its memory.

These were first written inside run.py and proxy_overhead.py, and every other benchmark that needed a server
imported them from there, which tied the scripts into a circle (run.py also imports the scripts that imported it).
They live here, importing no benchmark, so that any script can use them and the imports point one way.
"""

from __future__ import annotations

import asyncio
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
    """Resident memory of process ``pid`` in MiB: VmRSS now, or VmHWM, the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def start(*args: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m genai_server`` with these flags and settings, on a free port. The caller's MODEL*, BACKEND*,
    UPSTREAM* and SERVER* variables are left out, so that only what the benchmark passes configures the server."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "BACKEND", "UPSTREAM", "SERVER"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genai_server", "--server-port", str(port), "--log-level", "WARNING", *args],
        cwd=REPO,
        env={**clean, **env},
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    """Poll ``url``/health until it answers 200 (up to 2 minutes): a measurement must not time the start-up."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(url)
