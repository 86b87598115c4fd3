"""Settings precedence: CLI flag over env var over .env over default."""

from __future__ import annotations

from pathlib import Path

import pytest

from genai_server.settings import BUNDLED_MODEL, SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MODEL_PATH", "MODEL_ID", "SERVER_HOST", "SERVER_PORT", "CORS_ORIGINS", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings([])
    assert (settings.server_host, settings.server_port, settings.cors_origins) == ("127.0.0.1", 8000, ["*"])
    assert settings.resolved_model_path == BUNDLED_MODEL
    assert settings.resolved_model_id == BUNDLED_MODEL.name


def test_cli_beats_env_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "SERVER_PORT=7001\nLOG_LEVEL=debug\nMODEL_ID=from-dotenv\nCORS_ORIGINS=https://a.example,https://b.example\n"
    )
    monkeypatch.setenv("SERVER_PORT", "7002")
    monkeypatch.delenv("MODEL_ID", raising=False)
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.delenv("CORS_ORIGINS", raising=False)
    settings = load_settings(["--model-id", "from-cli"])
    assert settings.server_port == 7002
    assert settings.log_level == "DEBUG"
    assert settings.model_id == "from-cli"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


def test_model_id_defaults_to_the_folder_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MODEL_ID", raising=False)
    settings = load_settings(["--env-file", str(tmp_path / "none"), "--model-path", str(tmp_path / "phi-3.5-int4")])
    assert settings.resolved_model_id == "phi-3.5-int4"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--server-port", "0"], "SERVER_PORT"),
        (["--max-concurrent-requests", "0"], "MAX_CONCURRENT_REQUESTS"),
        (["--log-level", "loud"], "LOG_LEVEL"),
        (["--upstream-native-apis", "responses,assistants"], "UPSTREAM_NATIVE_APIS"),
        (["--models-dir", "/nonexistent", "--env-file", "/nonexistent"], "MODELS_DIR /nonexistent is not a folder"),
        (["--upstream-native-apis", "messages", "--env-file", "/nonexistent"], "native_apis is for the openai backend"),
    ],
)
def test_bad_values_name_the_setting(args: list[str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(args)


@pytest.mark.parametrize("url", ["ftp://host/v1", "http:///v1", "http://host:99999/v1", "not a url"])
def test_an_upstream_address_that_is_not_an_http_url_is_a_bad_setting(url: str, tmp_path: Path) -> None:
    """Named at start-up (exit 2), not a crash when the first request or the first log line parses it."""
    with pytest.raises(SettingsError, match="UPSTREAM_URL"):
        load_settings(["--backend", "openai", "--upstream-url", url, "--model-id", "m", "--env-file", "/nonexistent"])
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "m"\nbackend = "openai"\nurls = ["http://ok:8000/v1", "{url}"]\n')
    with pytest.raises(SettingsError, match="not"):
        load_settings(["--models-file", str(models), "--env-file", "/nonexistent"])
