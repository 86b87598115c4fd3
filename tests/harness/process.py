"""``python -m genai_server`` as a user runs it: a real process on a real port, its settings as environment
variables, its log in a file.

One helper, ``ServerProcess``, for every test that needs the process we ship: the embedded engine and gateways,
fleets of replicas, the console script of an installed wheel, a process that must fail to start. Its log goes to a
file, never to a pipe: a pipe nobody reads fills up and blocks the server's logging, and the server with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Self

from genai_server.settings import Settings
from tests.harness.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
# Every setting the server reads from the environment, from the settings model itself (a list written out here
# missed seven): cleared from the test's own environment, so that a developer's shell (or another test) never changes
# what a process under test is configured with.
SETTING_NAMES = tuple(name.upper() for name in Settings.model_fields)
MODULE = (sys.executable, "-m", "genai_server")
# Loading the bundled model takes a second or two; this only turns a process that never comes up into a failure.
HEALTHY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A port nothing listens on now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(*, unset: Iterable[str] = (), **settings: str) -> dict[str, str]:
    """This process's environment without any server setting (nor the ``unset`` names), plus ``settings``."""
    dropped = {*SETTING_NAMES, *unset}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(settings)
    return env


def wait_healthy(
    proc: subprocess.Popen[str],
    port: int,
    timeout: float = HEALTHY_TIMEOUT_S,
    log: Callable[[], str] | None = None,
) -> None:
    """Poll ``/health`` until it answers; fail at once if the process exits (with its ``log``, or its stderr when
    that is a pipe), or after ``timeout`` seconds."""

    def healthy() -> bool:
        assert proc.poll() is None, log() if log is not None else proc.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10):
                return True
        except OSError:
            return False

    eventually(healthy, timeout=timeout, interval=0.1, what="the server healthy (GET /health answered)")


class ServerProcess:
    """A server process with its log in a file.

    ``args`` go on the command line after ``command`` (by default ``python -m genai_server``; a test gives another:
    a script that injects a fault, an installed console script). ``settings`` are environment variables on top of
    ``server_env`` (``unset`` names more to clear). The port is ``SERVER_PORT`` in that environment, a free one
    unless ``port`` says which; a setting or argument of the test's own overrides it. A context manager: stopped
    (killed if it still runs) on exit.
    """

    def __init__(
        self,
        log_path: Path,
        *args: str,
        command: Sequence[str] = MODULE,
        port: int | None = None,
        cwd: Path = REPO,
        unset: Iterable[str] = (),
        **settings: str,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=cwd,
            env=server_env(unset=unset, **{"SERVER_PORT": str(self.port), **settings}),
            stdout=self._log,
            stderr=self._log,
            text=True,
        )

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT_S) -> Self:
        """Return once ``/health`` answers (a failure shows the log if the process exited first)."""
        wait_healthy(self.proc, self.port, timeout, log=self.log)
        return self

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr; the server logs to stderr only)."""
        return self.log_path.read_text()

    def log_lines(self) -> list[str]:
        """The log's complete lines: while the process runs, its last line may be half written (what a test
        polling the log for a line must not parse)."""
        text = self.log()
        return text[: text.rfind("\n") + 1].splitlines()

    def stop(self) -> None:
        """Kill the process if it still runs, and close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
