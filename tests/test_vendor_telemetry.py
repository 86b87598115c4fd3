"""ONNX Runtime's usage telemetry stays off: the official wheels otherwise keep a device id and an event store
for upload under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` (measured; see
genai_server/embedded/vendor_telemetry.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import chat_body
from tests.harness.process import ServerProcess

_BARE_ENGINE = """
import sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=16)
generator = og.Generator(model, params)
generator.append_tokens(og.Tokenizer(model).encode("hello"))
while not generator.is_done():
    generator.generate_next_token()
"""


# The runtime keeps no store at all where it believes it runs in CI (it reads these variables; measured: CI=true or
# GITHUB_ACTIONS=true leaves nothing, CI=false leaves the store). The test is about a user's box, so it clears them.
_CI_MARKERS = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "ORT_RUNNING_UNIT_TESTS",
)


def _home(home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(home)}


def _left_behind(home: Path) -> list[str]:
    return sorted(str(path.relative_to(home)) for path in home.rglob("*") if path.is_file())


async def test_the_server_leaves_no_telemetry_behind_where_the_bare_runtime_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not inherited: in-process tests of this session have turned telemetry off in this very environment, and a CI
    # runner's markers would turn the runtime's store off for the control too.
    for name in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY", *_CI_MARKERS):
        monkeypatch.delenv(name, raising=False)
    bare, served = tmp_path / "bare", tmp_path / "served"
    bare.mkdir()
    served.mkdir()
    # The control: the runtime on its own, in the same kind of environment, leaves its store (so this test can fail).
    subprocess.run([sys.executable, "-c", _BARE_ENGINE, str(BUNDLED_MODEL)], env=_home(bare), check=True, timeout=120)
    assert any("onnxruntime" in path for path in _left_behind(bare)), _left_behind(bare)

    server = ServerProcess(tmp_path / "server.log", HOME=str(served))
    try:
        server.wait_healthy()
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{server.url}/v1/chat/completions", json=chat_body(max_tokens=8)) as resp,
        ):
            assert resp.status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert _left_behind(served) == []
    assert "ONNX Runtime telemetry is off" in server.log()
