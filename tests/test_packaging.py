"""The distribution as a user gets it: built with ``python -m build``, installed with pip into a fresh virtualenv
(its dependencies from the package index), started as ``genai-server`` outside the checkout, asked something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from genai_server import __version__
from tests.harness.bodies import MODEL_ID
from tests.harness.process import REPO, ServerProcess

# A build and a pip install with every dependency: minutes, and `-m 'not slow'` leaves them out of a quick run.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it, as ``python -m build`` makes them (in isolated build envs)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed by pip; returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = dist.glob("*.whl")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=480)
    return venv / "bin"


def test_the_wheel_declares_what_requirements_txt_lists(dist: Path) -> None:
    """One list, two views: the metadata is read from requirements.txt at build time."""
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"genai_server-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"genai_server-{__version__}.dist-info/METADATA").decode()
        names = archive.namelist()
    declared = {
        str(Requirement(line.split(":", 1)[1])) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    }
    listed = {
        str(Requirement(line.split("#", 1)[0]))
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.split("#", 1)[0].strip()
    }
    assert declared == listed
    assert "Requires-Python: >=3.11" in metadata
    model = f"genai_server/bundled_model/{MODEL_ID}/"
    for part in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja"):
        assert model + part in names
    assert not any(name.startswith(("tests/", "etc/", "benchmarks/")) for name in names)


@pytest.fixture
def installed_server(installed: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """``genai-server`` from that virtualenv, started in an empty folder so that nothing of the checkout is seen."""
    folder = tmp_path / "empty"
    folder.mkdir()
    with ServerProcess(
        tmp_path / "server.log",
        command=[str(installed / "genai-server")],
        cwd=folder,
        unset=("PYTHONPATH", "VIRTUAL_ENV"),
        PATH=f"{installed}{os.pathsep}{os.environ.get('PATH', '')}",
        LOG_FORMAT="json",
    ) as server:
        yield server.wait_healthy(timeout=120)


def test_the_installed_console_script_serves_the_bundled_model(
    installed: Path, installed_server: ServerProcess
) -> None:
    port, proc = installed_server.port, installed_server.proc
    version = subprocess.run([str(installed / "genai-server"), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith(f"genai-server {__version__} ")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
        assert [model["id"] for model in json.loads(resp.read())["data"]] == [MODEL_ID]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] > 0
    for page in ("/", "/ui/playground.js", "/ui/playground.css"):  # the playground came with the package too
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{page}", timeout=10) as resp:
            assert resp.status == 200 and resp.read()
    proc.terminate()
    proc.wait(timeout=60)
    log = installed_server.log()
    assert proc.returncode == 0
    loaded = next(json.loads(line) for line in log.splitlines() if '"model loaded"' in line)
    assert Path(loaded["model_path"]).is_relative_to(installed.parent), "the model came with the package"
