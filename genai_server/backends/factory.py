"""One place that turns a model's entry and the settings into the backend serving it (not yet started).

Each adapter is built from a keyword-only config, so that no setting lands in another's place. What a backend
needs from the web app (the embedded engine's failure callback) is passed in: backends know nothing of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from genai_server.backends import Backend
from genai_server.backends.model_pool import ModelPool, OnDemandBackend
from genai_server.backends.ollama import OllamaBackend
from genai_server.backends.onnx import OnnxBackend, OnnxConfig
from genai_server.backends.openai_upstream import OpenAIUpstream
from genai_server.backends.relay import RelayConfig
from genai_server.embedded.engine import EmbeddedEngine, EngineConfig, OnnxEngine
from genai_server.embedded.engine_process import EngineProcess
from genai_server.settings import ModelEntry, Settings
from genai_server.shown_urls import shown_url

log = logging.getLogger(__name__)


def build_backend(
    entry: ModelEntry,
    settings: Settings,
    *,
    on_engine_failure: Callable[[BaseException], None],
    pool: ModelPool | None = None,
) -> Backend:
    """The backend serving ``entry``; ``on_engine_failure`` is called if an embedded engine's thread dies (a model
    loaded on demand, into ``pool``, only fails itself)."""
    if entry.backend == "onnx" and entry.on_demand and pool is not None:
        return on_demand_backend(entry, settings, pool)
    if entry.backend == "onnx":
        return embedded_backend(entry, settings, on_engine_failure=on_engine_failure)
    config = relay_config(entry, settings)
    log.info(
        "relaying to an upstream engine",
        extra={
            "fields": {
                "backend": entry.backend,
                "upstream_urls": [shown_url(url) for url in config.urls],
                "model": entry.id,
                "upstream_model": entry.upstream_name,
            }
        },
    )
    return OllamaBackend(config) if entry.backend == "ollama" else OpenAIUpstream(config)


def relay_config(entry: ModelEntry, settings: Settings) -> RelayConfig:
    """A relaying backend's config: the entry's replicas and names, the settings' timeouts and limits."""
    # Only the openai backend sends a key (the models file documents api_key for it alone).
    api_key = entry.api_key.get_secret_value() if entry.api_key and entry.backend == "openai" else None
    return RelayConfig(
        model_id=entry.id,
        upstream_model=entry.upstream_name,
        urls=tuple(entry.upstream_urls),  # at least one: checked by ModelEntry
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.upstream_connect_timeout_s, sock_read=settings.upstream_read_timeout_s
        ),
        api_key=api_key,
        always_usage=settings.stream_usage_always,
        max_tokens_limit=settings.max_tokens_limit,
        balance=entry.balance,
        load_factor=entry.load_factor,
        native_apis=frozenset(entry.native_apis),
    )


def on_demand_backend(entry: ModelEntry, settings: Settings, pool: ModelPool) -> OnDemandBackend:
    """A model folder loaded when asked, into ``pool``; its engine's death unloads it and fails it alone."""
    made: list[OnDemandBackend] = []

    def build() -> Backend:
        # Its death concerns the model only while it is the model's engine (not after a reload replaced it).
        own: list[Backend] = []
        engine = embedded_backend(entry, settings, on_engine_failure=lambda exc: made[0].engine_failed(exc, own[0]))
        own.append(engine)
        return engine

    length = context_length(entry.model_path)
    if length is None:  # said at start-up; its requests will say why it cannot load
        log.warning(
            "model folder's genai_config.json cannot be read: its requests will fail",
            extra={"fields": {"model": entry.id, "model_path": str(entry.model_path)}},
        )
    backend = OnDemandBackend(
        entry.id, length, build, pool, footprint_mb=footprint_mb(entry.model_path), ttl_s=entry.ttl_s
    )
    made.append(backend)
    return backend


# What an engine process takes beyond its model's files (the bundled model's: 73 MB, measured), rounded up.
ENGINE_OVERHEAD_MB = 80.0


def footprint_mb(model_path: Path) -> float:
    """What a model is counted as taking once loaded: its files, plus its engine process."""
    files = sum(path.stat().st_size for path in model_path.rglob("*") if path.is_file())
    return files / 2**20 + ENGINE_OVERHEAD_MB


def context_length(model_path: Path) -> int | None:
    """A model folder's context as its genai_config.json gives it (before it is loaded); None if it cannot say."""
    try:
        config = json.loads((model_path / "genai_config.json").read_text())
        length = config["model"]["context_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return length if isinstance(length, int) else None


def embedded_backend(
    entry: ModelEntry, settings: Settings, *, on_engine_failure: Callable[[BaseException], None]
) -> OnnxBackend:
    """The embedded engine on the entry's model folder (the bundled demo model when it names none)."""
    if entry.path is None:
        log.warning(
            "MODEL_PATH is not set: serving the bundled demo model %s, which has random weights and produces noise",
            entry.model_path.name,
        )
    engine: EmbeddedEngine
    if settings.engine_process:
        engine = EngineProcess(
            entry.model_path,
            engine_config(settings),
            memory_limit_mb=settings.engine_memory_limit_mb,
            compile_timeout_s=settings.engine_compile_timeout,
            log_level=settings.log_level,
            log_format=settings.log_format,
        )
    else:
        engine = OnnxEngine(entry.model_path, engine_config(settings))
    config = OnnxConfig(
        model_id=entry.id,
        created=int(time.time()),
        always_usage=settings.stream_usage_always,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens_limit=settings.max_tokens_limit,
    )
    return OnnxBackend(engine, config, on_failure=on_engine_failure)


def engine_config(settings: Settings) -> EngineConfig:
    """How the embedded engine batches and how much it may hold, from the ENGINE_* settings."""
    return EngineConfig(
        max_batch_size=settings.engine_max_batch_size,
        lanes=settings.engine_lanes,
        batch_wait_ms=settings.engine_batch_wait_ms,
        max_model_len=settings.max_model_len,
        memory_budget_mb=settings.engine_memory_budget_mb,
        threads=settings.engine_threads,
        prefix_cache=settings.prefix_cache_conversations,
        stream_interval=settings.stream_interval,
        shares_server_gil=not settings.engine_process,
    )
