"""``python -m genai_server`` as a user runs it: a real process on a real port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genai_server import __version__
from genai_server.embedded.engine import usable_cpus
from genai_server.exit_status import ExitStatus
from genai_server.settings import load_settings
from tests.harness.bodies import MODEL_ID
from tests.harness.process import REPO, SETTING_NAMES, ServerProcess, server_env
from tests.harness.waiting import eventually


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """The server as a user starts it, logging JSON."""
    with ServerProcess(tmp_path / "server.log", LOG_FORMAT="json") as running:
        yield running.wait_healthy()


def test_module_serves_the_bundled_model_and_stops_cleanly(server: ServerProcess) -> None:
    proc, port = server.proc, server.port
    assert _get(f"http://127.0.0.1:{port}/health") == {"status": "ok", "model": MODEL_ID}
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    result = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
    assert result["usage"]["completion_tokens"] == 4

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    stderr = server.log()
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
    with ServerProcess(tmp_path / "server.log", MODEL_PATH=str(broken)) as server:
        proc, port = server.proc, server.port
        proc.wait(timeout=60)
        stderr = server.log()
    assert proc.returncode == ExitStatus.MODEL_LOADING_FAILED
    assert "model_loading_failed" in stderr
    assert str(broken) in stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the port must never have been bound"


def test_missing_model_folder_exits_non_zero(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server.log", "--model-path", str(tmp_path / "nothing")) as server:
        server.proc.wait(timeout=60)
        proc, stderr = server.proc, server.log()
    assert proc.returncode == ExitStatus.MODEL_LOADING_FAILED
    assert "model_loading_failed" in stderr


def _exit(server: ServerProcess) -> tuple[subprocess.Popen[str], str]:
    """A server process that is expected to stop on its own: the process, once ended, and its log."""
    with server:
        server.proc.wait(timeout=60)
        return server.proc, server.log()


def test_bad_setting_is_named_and_exits_2(tmp_path: Path) -> None:
    proc, stderr = _exit(ServerProcess(tmp_path / "port.log", SERVER_PORT="not-a-port"))
    assert proc.returncode == 2
    assert "SERVER_PORT" in stderr
    proc, stderr = _exit(ServerProcess(tmp_path / "format.log", "--log-format", "xml"))
    assert proc.returncode == 2
    assert "LOG_FORMAT" in stderr


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "genai_server", *args],
        cwd=REPO,
        env=server_env(),
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


def _os_threads(server: ServerProcess) -> int:
    """OS threads of a server's engine process once its model is loaded (ONNX Runtime starts its pool with the
    session) and their number holds still (three reads 0.1 s apart): one CI run counted 5 and 4 where 6 and 4 are
    right, a count taken while a thread was starting or ending."""
    with server:
        pid = server.wait_healthy().proc.pid
        (engine,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        seen: list[int] = []

        def settled() -> int | None:
            seen.append(len(os.listdir(f"/proc/{engine}/task")))
            return seen[-1] if len(seen) >= 3 and len(set(seen[-3:])) == 1 else None

        return eventually(settled, interval=0.1, what="the engine process's thread count holding still")


@pytest.mark.parametrize(("cpu_max", "expected"), [("200000 100000", 2), ("150000 100000", 2), ("max 100000", None)])
def test_the_default_threads_respect_the_cgroups_cpu_quota(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    """In a pod or under docker run --cpus the affinity mask is every core of the node; the quota (cpu.max) is
    what the container may use: a quota of 2 CPUs is 2 threads (1.5 rounds up), none is the affinity mask."""
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (min(expected, affinity) if expected else affinity)


def test_engine_threads_size_the_engines_thread_pool(tmp_path: Path) -> None:
    """ENGINE_THREADS=n gives the session n intra-op threads (n - 1 in its pool besides the caller); by default
    every CPU this process may run on, so no core idles as it did with ONNX Runtime's default of one."""
    one = _os_threads(ServerProcess(tmp_path / "one.log", ENGINE_THREADS="1"))
    three = _os_threads(ServerProcess(tmp_path / "three.log", ENGINE_THREADS="3"))
    default = _os_threads(ServerProcess(tmp_path / "default.log"))
    assert three - one == 2
    assert default - one == len(os.sched_getaffinity(0)) - 1
    proc, stderr = _exit(ServerProcess(tmp_path / "zero.log", ENGINE_THREADS="0"))
    assert proc.returncode == 2 and "ENGINE_THREADS" in stderr
