"""``python -m genai_server`` as a user runs it: a real process on a real port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genai_server import __version__
from genai_server.exit_status import ExitStatus
from genai_server.settings import load_settings
from tests.conftest import MODEL_ID

REPO = Path(__file__).resolve().parents[1]
SETTING_NAMES = (
    "MODEL_PATH",
    "MODEL_ID",
    "SERVER_HOST",
    "SERVER_PORT",
    "MAX_CONCURRENT_REQUESTS",
    "MAX_QUEUED_REQUESTS",
    "QUEUE_TIMEOUT",
    "MODELS_FILE",
    "API_KEYS",
    "API_KEYS_FILE",
    "METRICS_REQUIRE_KEY",
    "SHUTDOWN_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_MESSAGES",
    "MAX_PROMPT_TOKENS",
    "MAX_TOKENS_LIMIT",
    "MAX_SEQUENCES_PER_REQUEST",
    "ENGINE_MEMORY_BUDGET_MB",
    "REQUEST_READ_TIMEOUT",
    "CLIENT_WRITE_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "LOG_PROMPTS",
    "ENGINE_MAX_BATCH_SIZE",
    "ENGINE_LANES",
    "ENGINE_BATCH_WAIT_MS",
    "MAX_MODEL_LEN",
    "BACKEND",
    "UPSTREAM_URL",
    "UPSTREAM_API_KEY",
    "UPSTREAM_MODEL",
    "UPSTREAM_CONNECT_TIMEOUT_S",
    "UPSTREAM_READ_TIMEOUT_S",
    "STREAM_USAGE_ALWAYS",
    "CORS_ORIGINS",
    "LOG_LEVEL",
    "LOG_FORMAT",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(settings)
    return env


def _start(*args: str, cwd: Path = REPO, quiet: bool = False, **settings: str) -> subprocess.Popen[str]:
    """The server as a process. Its log is piped for the test to read, or dropped (``quiet``) for a
    long-lived one nobody reads: a full pipe would block the server's logging, and the server with it."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "genai_server", *args],
        cwd=cwd,
        env=_env(**settings),
        stdout=output,
        stderr=output,
        text=True,
    )


@contextlib.contextmanager
def running_server(**settings: str) -> Iterator[str]:
    """A quiet server process with these settings, for a whole module; yields its URL."""
    port = _free_port()
    proc = _start("--server-port", str(port), quiet=True, **settings)  # type: ignore[arg-type]  # all str
    try:
        _wait_healthy(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.communicate()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _wait_healthy(proc: subprocess.Popen[str], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            _get(f"http://127.0.0.1:{port}/health")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy")


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _free_port()
    proc = _start("--server-port", str(port), LOG_FORMAT="json")
    try:
        _wait_healthy(proc, port)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_module_serves_the_bundled_model_and_stops_cleanly(server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = server
    assert _get(f"http://127.0.0.1:{port}/health") == {"status": "ok", "model": MODEL_ID}
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    result = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
    assert result["usage"]["completion_tokens"] == 4

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("demo model" in line["message"] for line in lines), "the bundled-model warning is logged"
    access = [line for line in lines if line.get("path") == "/v1/chat/completions"]
    assert access[0]["status"] == 200
    assert access[0]["completion_tokens"] == 4
    assert access[0]["inference_time_ms"] > 0
    assert access[0]["model"] == MODEL_ID
    assert len(access[0]["request_id"]) >= 16


def test_model_that_fails_to_load_exits_non_zero_before_binding(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "genai_config.json").write_text('{"model": {"type": "llama", "decoder": {}}}')
    port = _free_port()
    proc = _start(MODEL_PATH=str(broken), SERVER_PORT=str(port))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitStatus.MODEL_LOADING_FAILED
    assert "model_loading_failed" in stderr
    assert str(broken) in stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the port must never have been bound"


def test_missing_model_folder_exits_non_zero(tmp_path: Path) -> None:
    proc = _start("--model-path", str(tmp_path / "nothing"), "--server-port", str(_free_port()))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitStatus.MODEL_LOADING_FAILED
    assert "model_loading_failed" in stderr


def test_bad_setting_is_named_and_exits_2() -> None:
    proc = _start(SERVER_PORT="not-a-port")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "SERVER_PORT" in stderr
    proc = _start("--log-format", "xml")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "LOG_FORMAT" in stderr


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "genai_server", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_help_lists_every_setting_with_its_default() -> None:
    shown = " ".join(_cli("--help").split())  # argparse wraps lines
    for name in SETTING_NAMES:
        assert "--" + name.lower().replace("_", "-") in shown
    for default in ("[env SERVER_PORT; default 8000]", "[env SERVER_HOST; default 127.0.0.1]", "default onnx]"):
        assert default in shown
    # The names peers use, and on/off settings as switches.
    # Python 3.13's argparse writes the metavar once ("--server-port, --port SERVER_PORT"), 3.11's after each name.
    assert re.search(r"--server-port( SERVER_PORT)?, --port SERVER_PORT", shown), shown
    assert re.search(r"--server-host( SERVER_HOST)?, --host SERVER_HOST", shown), shown
    assert "--log-prompts, --no-log-prompts" in shown and "[env LOG_PROMPTS; default false]" in shown


def test_version_names_the_package_and_the_engine() -> None:
    assert _cli("--version").startswith(f"genai-server {__version__} (onnxruntime-genai 0.18.")


def test_short_names_and_switches_reach_the_settings() -> None:
    settings = load_settings(["--host", "0.0.0.0", "--port", "9001", "--log-prompts", "--no-stream-usage-always"])
    assert (settings.server_host, settings.server_port, settings.log_prompts) == ("0.0.0.0", 9001, True)
    assert settings.stream_usage_always is False
    assert load_settings(["--model", "/models/phi"]).model_path == Path("/models/phi")


def _os_threads(**settings: str) -> int:
    """OS threads of a server process once its model is loaded (ONNX Runtime starts its pool with the session)."""
    port = _free_port()
    proc = _start("--server-port", str(port), quiet=True, **settings)  # type: ignore[arg-type]  # all str
    try:
        _wait_healthy(proc, port)
        return len(os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        proc.kill()
        proc.communicate()


def test_engine_threads_size_the_engines_thread_pool() -> None:
    """ENGINE_THREADS=n gives the session n intra-op threads (n - 1 in its pool besides the caller); by default
    every CPU this process may run on, so no core idles as it did with ONNX Runtime's default of one."""
    one, three, default = _os_threads(ENGINE_THREADS="1"), _os_threads(ENGINE_THREADS="3"), _os_threads()
    assert three - one == 2
    assert default - one == len(os.sched_getaffinity(0)) - 1
    proc = _start(ENGINE_THREADS="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "ENGINE_THREADS" in stderr
