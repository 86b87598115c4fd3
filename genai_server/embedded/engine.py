"""The embedded ONNX Runtime GenAI engine, driven from one owner thread.

Why a thread of its own running the Engine API: ``og.Engine.run()`` releases
the GIL, so the event loop keeps serving while tokens are generated (measured
with ``benchmarks/loop_lateness.py``: loop lateness p99 0.17 ms with the Engine
against 12.7 ms, max 434 ms, with the Generator API, at the same tokens/s).
Every Engine call must come from the thread that created it, so that thread
owns the model and every request (``scheduler.py``); the event loop talks to it
only through a command queue, and it answers only with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from genai_server.embedded.detokenize import byte_table
from genai_server.embedded.scheduler import BatchScheduler, Delta, GuidanceRejected, Job, KvBudget, SamplingOptions
from genai_server.embedded.vendor_telemetry import turn_off as turn_off_vendor_telemetry
from genai_server.errors import EngineFailure, ModelLoadingFailed, ShuttingDown

__all__ = ["FALLBACK_CHAT_TEMPLATE", "Delta", "EngineConfig", "GuidanceRejected", "OnnxEngine", "SamplingOptions"]

log = logging.getLogger(__name__)

# A Phi-3-style template for models that ship none (the runtime raises "Empty chat template").
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True, kw_only=True)  # eight settings in a row are too easy to pass in the wrong order
class EngineConfig:
    """How the engine batches (sequences per static batch, batches run side by side, how long a batch waits
    for a burst to arrive) and the most tokens one sequence may hold, which sets its KV-cache memory."""

    max_batch_size: int = 8
    lanes: int = 2
    batch_wait_ms: float = 5.0
    max_model_len: int | None = None
    memory_budget_mb: float | None = None  # KV cache of running sequences; None: half of this machine's memory
    threads: int | None = None  # intra-op threads of the model's session; None: every CPU this process may use
    prefix_cache: int = 4  # finished conversations kept for their next turn (``prefix_cache.py``); 0 = none
    stream_interval: int = 1  # tokens handed to the event loop at a time, after the first


class OnnxEngine:
    """Loads one model folder and generates token streams for the serving layer."""

    def __init__(self, model_path: Path, config: EngineConfig | None = None) -> None:
        self.model_path = model_path
        self.config = config or EngineConfig()
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="onnx-engine-owner", daemon=True)
        self._scheduler: BatchScheduler | None = None
        self._tokenizer: Any = None
        # Tokenising runs in worker threads (off the event loop); the library does not promise it is thread-safe.
        self._tokenizer_lock = threading.Lock()
        self._model: Any = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event-loop side: every sequence being generated, so a dying owner thread can still answer each one.
        self._live: set[Job] = set()
        self.failure: BaseException | None = None
        # Called on the event loop if the owner thread dies: the server can no longer generate.
        self.on_failure: Callable[[BaseException], None] | None = None
        self.context_length = 0
        self.max_token_bytes = 0
        self.memory = KvBudget(0, 0, 0)
        self.threads = 0
        self.vocab_size = 0
        self.eos_token_ids: frozenset[int] = frozenset()
        self.has_chat_template = False
        self.chat_template = FALLBACK_CHAT_TEMPLATE  # its source: it decides how the model writes tool calls

    # ---- lifecycle (event loop side) ---------------------------------------------------

    async def start(self) -> None:
        """Load the model on the owner thread; raise ``ModelLoadingFailed`` with the reason."""
        turn_off_vendor_telemetry()
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._load_error is not None:
            self._thread.join()
            raise ModelLoadingFailed(f"cannot load model from {self.model_path}: {self._load_error}")

    async def close(self) -> None:
        """Cancel what is in flight, stop the owner thread and release the engine."""
        if self._thread.is_alive():
            self._commands.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def active_sequences(self) -> int:
        """Sequences waiting or generating now (0 = the engine is idle)."""
        return self._scheduler.active() if self._scheduler is not None else 0

    def waiting_sequences(self) -> int:
        """Sequences waiting for a batch to start."""
        return self._scheduler.waiting() if self._scheduler is not None else 0

    def kv_cache_usage(self) -> float:
        """The share of the memory budget that running sequences' KV caches hold (0-1)."""
        if self._scheduler is None or not self.memory.budget_bytes:
            return 0.0
        return self._scheduler.kv_bytes_reserved / self.memory.budget_bytes

    # ---- tokenizer (callable from any thread) ------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model's tokenizer counts them (from any thread; calls take turns)."""
        with self._tokenizer_lock:
            return [int(t) for t in self._live_tokenizer().encode(text)]

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Render the conversation, and the tools if any, with the model's template (a Phi-3-style one when it has
        none)."""
        template = None if self.has_chat_template else FALLBACK_CHAT_TEMPLATE
        with self._tokenizer_lock:
            return str(
                self._live_tokenizer().apply_chat_template(
                    json.dumps(messages),
                    template_str=template,
                    tools=json.dumps(tools) if tools else "",
                    add_generation_prompt=True,
                )
            )

    def _live_tokenizer(self) -> Any:
        tokenizer = self._tokenizer  # one read: the owner thread drops it when the engine closes
        if tokenizer is None:
            raise ShuttingDown("The server is shutting down; no new generation starts")
        return tokenizer

    # ---- generation (event loop side) --------------------------------------------------

    async def generate(
        self, prompt: list[int], options: SamplingOptions, cache_scope: str = ""
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one sequence; closing the iterator early cancels the sequence. Its KV cache, kept for
        a conversation's next turn, is continued only by a sequence of the same ``cache_scope``."""
        scheduler = self._scheduler
        assert scheduler is not None, "start() the engine first"
        if self.failure is not None:
            raise EngineFailure("the engine has failed; the server is restarting")
        if self._closed:
            raise ShuttingDown("The server is shutting down; no new generation starts")
        job = Job(np.asarray(prompt, dtype=np.int32), options, asyncio.get_running_loop(), asyncio.Queue(), cache_scope)
        self._live.add(job)
        self._commands.put(lambda: scheduler.submit(job))
        finished = False
        try:
            while not finished:
                delta = await job.queue.get()
                finished = delta.finish is not None or delta.error is not None
                if delta.rejected is not None:
                    raise GuidanceRejected(delta.rejected)
                if delta.error is not None:
                    raise EngineFailure("the engine failed to generate a response")
                yield delta
        finally:
            self._live.discard(job)
            if not finished:
                self._commands.put(lambda: scheduler.cancel(job))

    # ---- owner thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            scheduler = self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to start() and re-raised there
            self._load_error = exc
            self._ready.set()
            return
        self._scheduler = scheduler
        self._ready.set()
        try:
            self._serve(scheduler)
        except BaseException as exc:  # a broken scheduler: told to the loop, which stops the server
            log.critical("the engine owner thread failed; no generation is possible any more", exc_info=True)
            self._die(exc)
            return
        scheduler.shutdown()
        scheduler.deliver()
        self._closed = True
        # A submit that raced the stop is run, then cancelled like the rest: nobody waits forever.
        self._drain_commands(timeout=0)
        scheduler.shutdown()
        scheduler.deliver()
        self._tokenizer = self._model = None

    def _die(self, exc: BaseException) -> None:
        """Owner thread, last act: the event loop answers every live sequence and learns the engine is gone."""
        self.failure = exc
        self._closed = True
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
            self._loop.call_soon_threadsafe(self._on_death, exc)

    def _on_death(self, exc: BaseException) -> None:
        """Event loop: fail what is in flight (its clients get an error now) and report the failure."""
        for job in self._live:
            job.queue.put_nowait(Delta("", 0, error="engine owner thread failed"))
        if self.on_failure is not None:
            self.on_failure(exc)

    def _load(self) -> BatchScheduler:
        if not (self.model_path / "genai_config.json").is_file():
            raise FileNotFoundError(f"no genai_config.json in {self.model_path}")
        genai_config = json.loads((self.model_path / "genai_config.json").read_text())
        self.context_length = _context_length(genai_config, self.config.max_model_len)
        self.vocab_size = int(genai_config["model"].get("vocab_size", 0))
        self.memory = _kv_budget(genai_config, self.context_length, self.config.memory_budget_mb)
        config = og.Config(str(self.model_path))
        # The Engine allocates every sequence's KV cache for search.max_length tokens up front, so
        # that length (not the model's 128k, say) is what a sequence costs in memory.
        # Unless told, the session runs one intra-op thread: on a 2-core box the second core idled (the bare Engine
        # decoded at 37.8 tok/s with one thread, 67.1 with two). The overlay sets it without touching the folder.
        threads = self.config.threads or len(os.sched_getaffinity(0))
        config.overlay(
            json.dumps(
                {
                    "engine": {"static_batching": {"max_batch_size": self.config.max_batch_size}},
                    "search": {"max_length": self.context_length},
                    "model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}},
                }
            )
        )
        self.threads = threads
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self.max_token_bytes = _max_token_bytes(self._tokenizer, self.vocab_size)
        self.eos_token_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        template = _chat_template(self.model_path)
        self.has_chat_template = template is not None
        self.chat_template = template or FALLBACK_CHAT_TEMPLATE
        return BatchScheduler(
            self._model,
            self._tokenizer,
            lanes=self.config.lanes,
            eos_token_ids=self.eos_token_ids,
            max_batch_size=self.config.max_batch_size,
            batch_wait_s=self.config.batch_wait_ms / 1000,
            memory=self.memory,
            prefix_cache=self.config.prefix_cache,
            stream_interval=self.config.stream_interval,
            byte_table=byte_table(self.model_path),
        )

    def _serve(self, scheduler: BatchScheduler) -> None:
        while self._drain_commands(timeout=scheduler.wait_timeout()):
            scheduler.step()
            scheduler.deliver()

    def _drain_commands(self, *, timeout: float | None) -> bool:
        """Run queued commands, waiting up to ``timeout`` s for one (None: until one comes); False once asked
        to stop."""
        try:
            command = self._commands.get(block=timeout != 0, timeout=timeout or None)
        except queue.Empty:
            return True
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False


def _context_length(genai_config: dict[str, Any], cap: int | None) -> int:
    """Tokens per sequence, prompt included: the model's context, its configured max_length, and the cap."""
    limits = [int(genai_config["model"]["context_length"])]
    limits.append(int(genai_config.get("search", {}).get("max_length") or limits[0]))
    if cap is not None:
        limits.append(cap)
    return min(limits)


# KV cache entries are float32 in the CPU models the builder makes (fp16 models need half: the budget errs safe).
_KV_BYTES_PER_VALUE = 4


def _kv_budget(genai_config: dict[str, Any], context_length: int, budget_mb: float | None) -> KvBudget:
    """The KV-cache budget and the cost of one token: 2 (key, value) x layers x KV heads x head size x 4 bytes.
    A budget that cannot hold one full-context sequence could never serve: that is a start-up error."""
    decoder = genai_config["model"]["decoder"]
    per_token = (
        2
        * int(decoder["num_hidden_layers"])
        * int(decoder["num_key_value_heads"])
        * int(decoder["head_size"])
        * _KV_BYTES_PER_VALUE
    )
    budget = int(budget_mb * 2**20) if budget_mb is not None else default_memory_budget_bytes()
    if per_token * context_length > budget:
        raise ValueError(
            f"one sequence of {context_length} tokens needs {per_token * context_length / 2**20:.0f} MB of KV cache, "
            f"more than the engine's memory budget of {budget / 2**20:.0f} MB: lower MAX_MODEL_LEN (at most "
            f"{budget // per_token}) or raise ENGINE_MEMORY_BUDGET_MB"
        )
    return KvBudget(budget, per_token, context_length)


def default_memory_budget_bytes() -> int:
    """Half of the memory this process may use: the cgroup's limit (a container's) or the machine's RAM. The
    other half is for the weights, the runtime's buffers and the rest of the server."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total // 2


def _max_token_bytes(tokenizer: Any, vocab_size: int) -> int:
    """The most UTF-8 bytes one token decodes to: text of B bytes has at least B / this many tokens, which lets
    the server refuse a text that cannot fit the context without tokenising it. A token that is part of a
    character decodes to U+FFFD (3 bytes, more than its own): an overestimate keeps the bound safe. 0 (no
    bound) when the model does not say its vocabulary size."""
    return max(
        (len(tokenizer.decode(np.array([token], dtype=np.int32)).encode()) for token in range(vocab_size)), default=0
    )


def _chat_template(model_path: Path) -> str | None:
    """The template the runtime renders with: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config_file = model_path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text()).get("chat_template")
    if isinstance(template, list):  # several named templates: the runtime uses the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None
