"""What an operator reads in the log of the real process: where it listens, why it stopped, one line per fault,
and the request id on every line written on a request's behalf."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp

from genai_server.exit_status import ExitStatus
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.process import ServerProcess, free_port
from tests.harness.waiting import eventually_async


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _messages(lines: list[dict[str, Any]]) -> list[str]:
    return [line["message"] for line in lines]


def _logged_requests(server: ServerProcess) -> set[str]:
    """The request ids with an access line in the log so far."""
    access = [line for line in map(json.loads, server.log_lines()) if line["logger"] == "genai_server.access"]
    return {line["request_id"] for line in access}


def test_a_ready_server_says_where_it_listens_and_a_stop_says_how_it_ended(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server.log", LOG_FORMAT="json") as server:
        server.wait_healthy()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == ExitStatus.STOPPED
        messages = _messages(_lines(server.log()))
    listening = f"listening on http://127.0.0.1:{server.port} (model {MODEL_ID}, backend onnx)"
    assert listening in messages
    stop = messages.index("received SIGTERM: stopping")
    assert messages.index(listening) < stop
    assert messages[stop + 1].startswith("draining: 0 running, 0 queued")
    assert messages[stop + 2] == "drained: every request finished"


def test_a_busy_port_is_one_line_and_a_status_a_supervisor_retries(tmp_path: Path) -> None:
    """Not a traceback; in the json format, one JSON object."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for fmt in ("json", "text"):
            with ServerProcess(tmp_path / f"{fmt}.log", "--port", str(port), port=port, LOG_FORMAT=fmt) as server:
                server.proc.wait(60)
                proc, stderr = server.proc, server.log()
            assert proc.returncode == ExitStatus.UNAVAILABLE
            errors = [line for line in stderr.splitlines() if "ERROR" in line]
            assert len(errors) == 1, stderr
            assert f"cannot listen on 127.0.0.1:{port}" in errors[0] and "address already in use" in errors[0].lower()
            assert "Traceback" not in stderr and "draining" not in stderr
            if fmt == "json":
                assert json.loads(errors[0])["code"] == "cannot_listen"


async def test_every_line_written_for_a_request_carries_its_id(tmp_path: Path) -> None:
    """A client that leaves mid-stream and an upstream that refuses: each line they cause names the request."""
    down = f"http://127.0.0.1:{free_port()}/v1"
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "{MODEL_ID}"\n\n[[models]]\nid = "down"\nbackend = "openai"\nurl = "{down}"\n')
    with ServerProcess(tmp_path / "server.log", MODELS_FILE=str(models), LOG_FORMAT="json") as server:
        before = len(server.wait_healthy().log().splitlines())
        async with aiohttp.ClientSession() as session:
            body = chat_body(max_tokens=1900, min_tokens=1900, stream=True)
            async with session.post(
                f"{server.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "leaves"}
            ) as resp:
                await resp.content.readline()  # the first event, then the client goes
            for stream in (False, True):
                async with session.post(
                    f"{server.url}/v1/chat/completions",
                    json=chat_body(model="down", stream=stream),
                    headers={"X-Request-Id": f"refused-{stream}"},
                ) as resp:
                    assert resp.status == 502
        # The access line of each request written (the one of the client that left, once the server noticed).
        await eventually_async(lambda: _logged_requests(server) >= {"leaves", "refused-False", "refused-True"})
        lines = _lines(server.log())[before:]
    assert lines and all("request_id" in line for line in lines), lines
    by_id = {rid: [line for line in lines if line["request_id"] == rid] for rid in ("leaves", "refused-False")}
    left = [line["message"] for line in by_id["leaves"]]
    # Noticed on a write ("... mid-stream") or by aiohttp cancelling the handler: either way, one line, then the 499.
    assert len(left) == 2 and left[0].startswith("client disconnected"), left
    assert left[1] == "POST /v1/chat/completions 499"
    refused = by_id["refused-False"]
    assert len(refused) == 2  # the fault, with its cause, and the access line
    fault = refused[0]
    assert (fault["level"], fault["code"], fault["status"]) == ("WARNING", "upstream_unavailable", 502)
    assert "Connect" in fault["cause"] and fault["upstream_url"].startswith(down)
    assert not any("exc_info" in line for line in lines)
