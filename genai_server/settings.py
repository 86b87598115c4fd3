"""Settings, read once at start-up from CLI flags, environment variables and an optional ``.env`` file.

Precedence, highest first: CLI flag, environment variable, ``.env`` file, default.
Nothing else in the package reads ``os.environ``: the one ``Settings`` object is passed down.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from genai_server import __version__
from genai_server.shown_urls import shown_url

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled_model" / "tiny-random-llama-int4"

BackendName = Literal["onnx", "openai", "ollama"]
# The APIs besides chat an upstream may serve itself (relayed as they are) rather than have translated to chat.
NativeApi = Literal["responses", "messages"]


def _http_url(url: str) -> str:
    """An upstream address: http(s), a host, a port that parses; anything else is a bad setting, not a crash later."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError("an upstream URL's port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown_url(url)!r} is not an http(s) URL with a host")
    return url


class ModelEntry(BaseModel):
    """One model the server offers and the backend that serves it (a ``[[models]]`` table of MODELS_FILE)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="the id clients send as model")
    backend: BackendName = "onnx"
    path: Path | None = Field(None, description="onnx: the model folder (default: the bundled demo model)")
    url: str | None = Field(None, description="openai/ollama: the upstream's address")
    urls: list[str] | None = Field(
        None, min_length=1, max_length=64, description="openai/ollama: several replicas of the upstream, instead of url"
    )
    balance: Literal["cache_aware", "least_in_flight", "round_robin"] = Field(
        "cache_aware",
        description="how a request picks among urls: cache_aware sends a conversation's next turn (chat, Responses) "
        "to the replica that served its earlier ones, which holds their KV cache, unless that replica is overloaded, "
        "and everything else to the one with the fewest in flight from here; least_in_flight always does the "
        "latter; round_robin takes them in turn",
    )
    load_factor: float = Field(
        1.25,
        ge=1.0,
        le=100.0,
        description="cache_aware: a conversation's replica is passed over while it has more than this times the "
        "mean of requests in flight (this one counted)",
    )
    upstream_model: str | None = Field(None, description="openai/ollama: the upstream's name for it (default: id)")
    api_key: SecretStr | None = Field(None, description="openai: bearer key for the upstream")
    native_apis: list[NativeApi] = Field(
        default_factory=list,
        description="openai: the APIs the upstream serves itself (responses, messages), relayed as they are "
        "instead of translated to chat completions",
    )
    on_demand: bool = Field(
        False, description="onnx: loaded on its first request and unloaded when idle (every MODELS_DIR model is)"
    )
    ttl_s: float | None = Field(
        None, ge=0, description="on_demand: seconds it may stay idle before it is unloaded (default: MODEL_TTL_S)"
    )

    @field_validator("url")
    @classmethod
    def _one_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("urls")
    @classmethod
    def _each_url(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_http_url(url) for url in value]

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if self.backend != "onnx" and not (self.url or self.urls):
            raise ValueError(f"model {self.id!r}: backend {self.backend} needs a url (or urls)")
        if self.url and self.urls:
            raise ValueError(f"model {self.id!r}: url or urls, not both")
        if self.native_apis and self.backend != "openai":
            raise ValueError(f"model {self.id!r}: native_apis is for the openai backend")
        if self.urls is not None and len({shown_url(url) for url in self.urls}) != len(self.urls):
            # Two spellings of one address (a trailing slash) would be one replica counted twice, in two series.
            raise ValueError(f"model {self.id!r}: urls names a replica twice")
        return self

    @property
    def upstream_urls(self) -> list[str]:
        """Every replica's address (one for ``url``)."""
        return self.urls or ([self.url] if self.url else [])

    @property
    def model_path(self) -> Path:
        """The folder an onnx entry loads."""
        return self.path if self.path is not None else BUNDLED_MODEL

    @property
    def upstream_name(self) -> str:
        """The model name sent upstream."""
        return self.upstream_model or self.id


class Settings(BaseSettings):
    """Every setting of the server. Each field is also an env var (upper case) and a CLI flag."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    models_file: Path | None = Field(
        None,
        description="TOML file of [[models]] (id, backend, path or url, upstream_model, api_key): several "
        "models on several backends; replaces BACKEND/MODEL_PATH/UPSTREAM_* when set",
    )
    backend: BackendName = Field(
        "onnx",
        description="onnx: the embedded engine; openai: relay to an OpenAI-compatible UPSTREAM_URL; "
        "ollama: Ollama's native API at UPSTREAM_URL",
    )
    upstream_url: str | None = Field(
        None,
        description="the upstream: its OpenAI base URL, e.g. http://127.0.0.1:8001/v1 (openai), or "
        "Ollama's address, e.g. http://127.0.0.1:11434 (ollama)",
    )
    upstream_api_key: SecretStr | None = Field(None, description="bearer key for the upstream, if it wants one")
    upstream_model: str | None = Field(
        None, description="model name the upstream knows (default: MODEL_ID); clients see MODEL_ID"
    )
    upstream_native_apis: Annotated[list[NativeApi], NoDecode] = Field(
        default_factory=list,
        description="comma-separated APIs the upstream serves itself (responses, messages), relayed as they are "
        "instead of translated to chat completions",
    )
    upstream_connect_timeout_s: float = Field(5.0, gt=0, description="seconds to connect to the upstream")
    upstream_read_timeout_s: float = Field(
        300.0, gt=0, description="seconds the upstream may stay silent, first token included, before a 504"
    )
    model_path: Path | None = Field(
        None, description="ONNX Runtime GenAI model folder; unset = the bundled demo model (noise)"
    )
    models_dir: Path | None = Field(
        None,
        description="a folder of ONNX Runtime GenAI model folders, each served under its folder's name, loaded on "
        "its first request and unloaded when idle or to make room (beside MODELS_FILE's models, if any)",
    )
    max_loaded_models: int = Field(2, ge=1, le=64, description="MODELS_DIR models in memory at once")
    models_memory_mb: float | None = Field(
        None,
        gt=0,
        description="memory the MODELS_DIR models may take together, each counted as its files plus 80 MB for its "
        "engine process (measured); loading one past it unloads idle ones first (default: MAX_LOADED_MODELS only)",
    )
    model_ttl_s: float = Field(
        0.0, ge=0, description="seconds a MODELS_DIR model may stay idle before it is unloaded; 0 = until evicted"
    )
    model_load_timeout_s: float = Field(
        120.0, gt=0, description="seconds a MODELS_DIR model may take to load; a request waits at most that"
    )
    model_id: str | None = Field(None, description="model id clients send; default: the model folder's name")
    server_host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    server_port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    max_concurrent_requests: int = Field(
        8, ge=1, description="generation requests in flight at once; the next one gets 429 rate_limit_exceeded"
    )
    max_queued_requests: int = Field(
        32, ge=0, description="generation requests that may wait for a slot, in arrival order; beyond, 429"
    )
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait in the queue before it gets 429")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body; larger -> 413")
    max_messages: int = Field(256, ge=1, description="most messages in one chat request")
    max_sequences_per_request: int = Field(
        16, ge=1, le=1024, description="most sequences one request may ask for: n x the prompts of a completion"
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="most prompt tokens per request on the embedded engine (default: the context)"
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="most tokens one choice may ask for (max_tokens); also the cap when it is unset"
    )
    request_read_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send its body -> 408")
    stream_keepalive_interval: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="seconds a stream may go without an event before an SSE comment (': keep-alive') is sent, so "
        "that an idle proxy does not cut it during a long prefill or an upstream's silence; 0 = never",
    )
    responses_store_max_items: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="responses kept in memory for previous_response_id and GET /v1/responses/{id}, least recently "
        "used dropped first; 0 = none kept",
    )
    responses_store_max_mb: float = Field(
        64.0, gt=0, le=1_000_000, description="most memory (as JSON) the kept responses may hold together"
    )
    client_write_timeout: float = Field(
        60.0, gt=0, description="seconds a stream may wait on a client that does not read before it is dropped"
    )
    keepalive_timeout: float = Field(
        75.0,
        ge=0,
        description="seconds a connection may stay idle, before its first request too; longer than a load "
        "balancer's idle timeout (AWS ALB, nginx: 60 s), or it may reuse a connection just closed here",
    )
    ui: bool = Field(True, description="serve the playground, a chat page, at / (--no-ui: no page)")
    log_prompts: bool = Field(False, description="log prompts and completions (off: they are never logged)")
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="seconds in-flight requests may finish after SIGTERM/SIGINT before their streams "
        "are ended with an error event",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="most tokens per sequence, prompt included (default: the model's context); "
        "each sequence's KV cache is allocated for this many tokens",
    )
    engine_memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description="KV-cache memory running sequences may hold per embedded model (MB); work beyond it waits "
        "(default: half of the machine's or container's memory)",
    )
    engine_process: bool = Field(
        True,
        description="run each embedded engine in a supervised process of its own, so that native code a request "
        "reaches (its grammar's compiler) cannot crash, grow or stall the server; off: in the server's process",
    )
    engine_memory_limit_mb: float | None = Field(
        None,
        gt=0,
        description="memory cap of an engine process (MB): past it the process is stopped and restarted, failing "
        "only its requests (default: twice the model's files, plus ENGINE_MEMORY_BUDGET_MB, plus 1024; at most "
        "90 percent of the machine's or container's memory)",
    )
    engine_compile_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="seconds one grammar (response_format, tools) may compile in an engine process; past it the "
        "process is stopped and restarted, and the request and its grammar get a 400",
    )
    engine_max_batch_size: int = Field(
        8, ge=1, le=64, description="sequences the engine decodes together in one static batch"
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="threads the engine computes with (ONNX Runtime intra-op threads); default: every CPU this "
        "process may run on",
    )
    engine_lanes: int = Field(
        2,
        ge=1,
        le=8,
        description="static batches run side by side, so a new request need not wait for a running batch to finish",
    )
    prefix_cache_conversations: int = Field(
        4,
        ge=0,
        le=64,
        description="finished sequences whose KV cache stays in memory so that a later prompt sharing a long prefix "
        "with one (a conversation's next turn, the same prompt, a shared document) prefills only the rest (least "
        "recently used dropped first, and whenever running work needs the memory); 0 = off",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=256,
        description="tokens a stream sends per chunk after the first (which always goes at once); more than 1 "
        "saves the event loop's work per token, which matters on a few cores with a fast model",
    )
    engine_batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="how long a batch waits for more arrivals before it starts (a static batch cannot take latecomers)",
    )
    stream_usage_always: bool = Field(
        False,
        description="end every stream with the usage + metrics chunk, even when the client did not ask "
        "for stream_options.include_usage",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys clients must send; none = open server"
    )
    api_keys_file: Path | None = Field(None, description="file of bearer keys, one per line (# comments)")
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys that alone may load and unload models (POST /models/load, "
        "/models/unload); each is an API key too, so setting one turns keys on",
    )
    metrics_require_key: bool = Field(False, description="require an API key for /metrics too (health stays public)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="comma-separated origins allowed by CORS; * for any"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names a server bound to loopback also answers to (a proxy's); other "
        "names are refused with 403, so that a web page cannot reach it through DNS rebinding",
    )
    slo_ttft_ms: float | None = Field(
        None,
        gt=0,
        description="a request's time-to-first-token objective (ms): it counts toward goodput when met, and is "
        "refused at once when it cannot be (SLO_ADMISSION)",
    )
    slo_admission: bool = Field(
        True,
        description="refuse at once (429 slo_unattainable, with Retry-After) a generation request whose predicted "
        "time to first token already exceeds its objective (its x-slo-ttft-ms header, else SLO_TTFT_MS); off: the "
        "objectives only count goodput",
    )
    slo_tpot_ms: float | None = Field(
        None, gt=0, description="goodput: a request meets its time-per-output-token objective within this many ms"
    )
    slo_e2e_ms: float | None = Field(
        None, gt=0, description="goodput: a request meets its end-to-end objective within this many ms"
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector (OTLP over HTTP, e.g. http://127.0.0.1:4318): one span per generation "
        "request goes to its /v1/traces; unset = no traces. The other OTEL_* variables are read by the SDK",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    log_format: Literal["json", "text"] = Field("text", description="json (one object per line) or text")

    @field_validator(
        "cors_origins", "api_keys", "admin_api_keys", "allowed_hosts", "upstream_native_apis", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @model_validator(mode="after")
    def _check_upstream(self) -> Settings:
        if self.models_file is not None:
            return self  # the file names every model and its backend
        if self.backend != "onnx" and not self.upstream_url:
            raise ValueError(f"UPSTREAM_URL is required when BACKEND={self.backend}")
        if self.backend == "ollama" and not (self.model_id or self.upstream_model):
            raise ValueError(f"MODEL_ID or UPSTREAM_MODEL is required when BACKEND={self.backend}")
        return self

    _entries: list[ModelEntry] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _read_models(self) -> Settings:
        if self.models_file:
            self._entries = _read_models_file(self.models_file)
        elif not self.discover_upstream_models and self.models_dir is None:
            self._entries = [self._single_entry()]
        if self.models_dir is not None:
            self._entries = self._entries + _models_in(self.models_dir)
            if len({entry.id for entry in self._entries}) != len(self._entries):
                raise ValueError("MODELS_DIR: a model folder has the id of another model")
        return self

    @property
    def discover_upstream_models(self) -> bool:
        """BACKEND=openai naming no model: serve every model the upstream lists (read at start-up)."""
        return self.backend == "openai" and not (self.models_file or self.model_id or self.upstream_model)

    def _single_entry(self) -> ModelEntry:
        key = self.upstream_api_key
        return ModelEntry(
            id=self.resolved_model_id,
            backend=self.backend,
            path=self.model_path,
            url=self.upstream_url,
            upstream_model=self.resolved_upstream_model,
            api_key=key,
            native_apis=self.upstream_native_apis,
        )

    @property
    def all_api_keys(self) -> list[str]:
        """API_KEYS and the keys of API_KEYS_FILE together."""
        keys = [key.get_secret_value() for key in [*self.api_keys, *self.admin_api_keys]]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys

    @model_validator(mode="after")
    def _check_keys_file(self) -> Settings:
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"API_KEYS_FILE {self.api_keys_file} cannot be read")
        return self

    @property
    def models(self) -> list[ModelEntry]:
        """Every model to serve, in order (the first is the one /health names); none when they are discovered."""
        return self._entries

    @property
    def resolved_upstream_model(self) -> str:
        """The model name sent upstream."""
        return self.upstream_model or self.resolved_model_id

    @property
    def resolved_model_path(self) -> Path:
        """The model folder to load: the configured one, or the bundled demo model."""
        return self.model_path if self.model_path is not None else BUNDLED_MODEL

    @property
    def resolved_model_id(self) -> str:
        """The id clients send as ``model``."""
        if self.backend != "onnx":
            return self.model_id or self.upstream_model or ""
        return self.model_id or self.resolved_model_path.resolve().name


def _models_in(folder: Path) -> list[ModelEntry]:
    """Every ONNX Runtime GenAI model folder (one holding genai_config.json) directly under ``folder``, by name."""
    if not folder.is_dir():
        raise ValueError(f"MODELS_DIR {folder} is not a folder")
    found = sorted(path for path in folder.iterdir() if (path / "genai_config.json").is_file())
    if not found:
        raise ValueError(f"MODELS_DIR {folder} holds no model folder (one with genai_config.json)")
    return [ModelEntry(id=path.name, backend="onnx", path=path, on_demand=True) for path in found]


def _read_models_file(path: Path) -> list[ModelEntry]:
    """The ``[[models]]`` tables of a TOML file, ids unique."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read MODELS_FILE {path}: {exc}") from None
    except RecursionError:  # arrays nested thousands deep: a bad setting (2), not a crash with a traceback (1)
        raise ValueError(f"cannot read MODELS_FILE {path}: it is nested too deeply") from None
    try:
        entries = [ModelEntry.model_validate(item) for item in data.get("models", [])]
    except ValidationError as exc:
        raise ValueError(f"MODELS_FILE {path}: {describe_errors(exc)}") from None
    if not entries:
        raise ValueError(f"MODELS_FILE {path} has no [[models]]")
    ids = [entry.id for entry in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"MODELS_FILE {path} names a model id twice")
    return entries


class SettingsError(Exception):
    """A setting has a bad value; the message names it."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The short names peers use (vLLM, llama-server, uvicorn), beside the long ones that mirror the env vars.
_ALIASES = {"server_host": ["--host"], "server_port": ["--port"], "model_path": ["--model"]}


def _shown_default(name: str) -> str:
    """A field's default as ``--help`` shows it; none when unset (the description says what unset means)."""
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    if isinstance(default, list):
        default = ",".join(str(item) for item in default)
    if isinstance(default, bool):
        default = str(default).lower()
    return f"; default {default}"


def _version() -> str:
    engine = importlib.metadata.version("onnxruntime-genai")
    return f"genai-server {__version__} (onnxruntime-genai {engine}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    """A CLI with one flag per setting; flags override env vars and ``.env``. On/off settings are switches
    (``--log-prompts`` / ``--no-log-prompts``)."""
    parser = argparse.ArgumentParser(
        prog="genai-server",
        description="OpenAI-compatible server for ONNX Runtime GenAI models (also: python -m genai_server).",
        epilog="Every flag can also be set as an environment variable (e.g. SERVER_PORT) or in a .env file; "
        "precedence: flag, environment, .env, default.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file to read (default .env)")
    for name, field in Settings.model_fields.items():
        flags = [_flag(name), *_ALIASES.get(name, [])]
        help_text = f"{field.description} [env {name.upper()}{_shown_default(name)}]"
        if field.annotation is bool:
            parser.add_argument(*flags, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse CLI flags and build the validated settings, or raise ``SettingsError`` naming the bad one."""
    args = vars(build_parser().parse_args(argv))
    env_file = args.pop("env_file")
    overrides = {name: value for name, value in args.items() if value is not None}
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """One readable line per bad setting, named as the env var users set."""
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings; its input is all of them, secrets included: not shown
            lines.append(f"invalid settings: {err['msg'].removeprefix('Value error, ')}")
            continue
        name = str(err["loc"][0]).upper()
        shown = "***" if "key" in name.lower() else repr(err.get("input"))
        lines.append(f"invalid setting {name}={shown}: {err['msg']}")
    return "; ".join(lines)
