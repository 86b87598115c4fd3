"""llama.cpp's llama-server as a yardstick: where a benchmark model's GGUF lies, and starting the server on it.

vs_llama_cpp.py and chat_turns.py both run llama-server; chat_turns.py used to import these from vs_llama_cpp.py,
one script reaching into another's private helpers. Here they import no benchmark script, so either can use them.
Build llama-server and the GGUF first (scripts/build_llama_server.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_llama_server import SERVER  # noqa: E402 - scripts/ is put on the path just above
from make_model import PRESETS  # noqa: E402
from server_process import free_port  # noqa: E402


def gguf_path(preset_name: str) -> Path:
    """The Q4_0 GGUF that scripts/build_llama_server.py makes of this make_model.py preset's weights."""
    return REPO / "models" / f"{PRESETS[preset_name].name.removesuffix('-int4')}-q4_0.gguf"


def start_llama_server(gguf: Path, context: int, *, cache_prompt: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """llama-server with 8 slots (so 8 streams decode together) and as many threads as this server gets. Its prompt
    cache is off unless asked: it reuses any common prefix, so every repeated prompt of the throughput and prefill
    figures would be served from cache, and they would compare a cache with an engine."""
    port = free_port()
    threads = str(len(os.sched_getaffinity(0)))
    proc = subprocess.Popen(
        [
            str(SERVER),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            threads,
            "-tb",
            threads,
            "-np",
            "8",
            "-c",
            str(8 * context),
            "--log-disable",
            *([] if cache_prompt else ["--no-cache-prompt"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"
