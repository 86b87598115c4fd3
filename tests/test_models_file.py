"""MODELS_FILE: one server in front of several models on several backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from genai_server.settings import SettingsError, load_settings
from tests.harness.in_process import ClientFactory
from tests.harness.responses import metric_sample
from tests.harness.upstream import ScriptedUpstream

REPO_ETC = Path(__file__).resolve().parents[1] / "etc"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


async def test_several_models_on_several_backends(
    make_client: ClientFactory,
    tmp_path: Path,
    scripted: tuple[str, ScriptedUpstream],
) -> None:
    url, _ = scripted
    models = _write(
        tmp_path,
        f"""
[[models]]
id = "local-a"

[[models]]
id = "local-b"
backend = "onnx"

[[models]]
id = "remote"
backend = "openai"
url = "{url}/v1"
upstream_model = "llamacpp"
""",
    )
    client = await make_client(models_file=models)
    listed = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["local-a", "local-b", "remote"]
    assert (await (await client.get("/health")).json())["model"] == "local-a"
    for model in ("local-a", "local-b", "remote"):
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0},
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["model"] == model
    missing = await client.post(
        "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert missing.status == 404
    metrics = await (await client.get("/metrics")).text()
    for model, backend in (("local-a", "onnx"), ("local-b", "onnx"), ("remote", "openai")):
        assert metric_sample(metrics, "genai_server_requests_total", model=model, backend=backend, status="200") == 1
    assert metric_sample(metrics, "genai_server_requests_total", model="-", status="404") == 1


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[[models]]\nid = 'a'\n[[models]]\nid = 'a'\n", "twice"),
        ("[[models]]\nid = 'a'\nbackend = 'openai'\n", "needs a url"),
        # One replica spelt two ways (a trailing slash) would be counted twice, in two metrics series.
        (
            "[[models]]\nid = 'a'\nbackend = 'openai'\nurls = ['http://h:1/v1', 'http://h:1/v1/']\n",
            "names a replica twice",
        ),
        ("[[models]]\nid = 'a'\nflavour = 'x'\n", "FLAVOUR"),
        ("models = 3 = 4", "cannot read"),
        ("models = " + "[" * 5000 + "]" * 5000, "nested too deeply"),  # was exit 1 with a traceback
        ("", "no [[models]]"),
    ],
)
def test_bad_models_files_are_named(tmp_path: Path, text: str, complaint: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SettingsError, match="MODELS_FILE") as error:
        load_settings(["--models-file", str(path), "--env-file", str(tmp_path / "none")])
    assert complaint in str(error.value)


def test_the_example_file_is_valid() -> None:
    settings = load_settings(["--models-file", str(REPO_ETC / "models.example.toml"), "--env-file", "/nonexistent"])
    assert [(m.id, m.backend) for m in settings.models] == [
        ("phi-3.5-mini", "onnx"),
        ("llama-3-8b", "openai"),
        ("qwen2.5-7b", "openai"),
        ("qwen2.5-0.5b", "ollama"),
    ]
    assert settings.models[2].upstream_urls == ["http://10.0.0.11:8000/v1", "http://10.0.0.12:8000/v1"]
