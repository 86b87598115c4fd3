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
import math
import os
import queue
import re
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime_genai as og

from genai_server.embedded.chat_text import control_texts, encode_contents_as_text, refuse_controls_outside_text
from genai_server.embedded.detokenize import byte_table
from genai_server.embedded.scheduler import (
    BatchScheduler,
    CompileWatch,
    DeliveryLoop,
    Delta,
    GuidanceRejected,
    Job,
    KvBudget,
    SamplingOptions,
)
from genai_server.embedded.vendor_telemetry import turn_off as turn_off_vendor_telemetry
from genai_server.errors import EngineFailure, ModelLoadingFailed, ShuttingDown

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "Delta",
    "EmbeddedEngine",
    "EngineConfig",
    "EngineFacts",
    "GuidanceRejected",
    "OnnxEngine",
    "SamplingOptions",
    "raise_for",
    "read_deltas",
]

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
    prefix_cache: int = 4  # finished sequences kept for prompts that share their prefix (``prefix_cache.py``); 0 = none
    stream_interval: int = 1  # tokens handed to the event loop at a time, after the first
    shares_server_gil: bool = False  # runs in the server's process (ENGINE_PROCESS=false): see the scheduler


def raise_for(delta: Delta) -> None:
    """A delta that ends its sequence in failure, as the error the backend maps: a refused grammar (the client's),
    or the engine's own failure."""
    if delta.rejected is not None:
        raise GuidanceRejected(delta.rejected)
    if delta.error is not None:
        raise EngineFailure("the engine failed to generate a response")


async def read_deltas(
    deltas: asyncio.Queue[Delta], *, done: Callable[[], None], abandoned: Callable[[], None]
) -> AsyncGenerator[Delta, None]:
    """A sequence's deltas up to its last, a failure raised as its error (``raise_for``); ``done`` runs at the end
    whatever it is, and ``abandoned`` too when the reader leaves before the last (to cancel the sequence)."""
    finished = False
    try:
        while not finished:
            delta = await deltas.get()
            finished = delta.finish is not None or delta.error is not None
            raise_for(delta)
            yield delta
    finally:
        done()
        if not finished:
            abandoned()


# Tokenizing and templates run on this many threads beside generation (the engine process's pool): what the routes
# that only tokenize are allowed at once.
TOKENIZER_THREADS = 2


@dataclass(frozen=True)
class EngineFacts:
    """What the loaded model is, as the backend needs it: read once when the engine starts."""

    context_length: int = 0  # tokens per sequence, prompt included
    max_token_bytes: int = 0  # the most UTF-8 bytes one token decodes to (0: unknown)
    vocab_size: int = 0
    threads: int = 0
    memory: KvBudget = field(default_factory=lambda: KvBudget(0, 0, 0))
    eos_token_ids: frozenset[int] = frozenset()
    bos_token_id: int | None = None  # the token the tokenizer may put first
    has_chat_template: bool = False
    chat_template: str = FALLBACK_CHAT_TEMPLATE  # its source: it decides how the model writes tool calls


class EmbeddedEngine(Protocol):
    """What the embedded backend drives: the engine on its owner thread here (``OnnxEngine``), or the same engine
    in a process of its own behind a wall (``engine_process.EngineProcess``)."""

    model_path: Path
    facts: EngineFacts
    failure: BaseException | None  # set once the engine can no longer generate (the server stops)
    on_failure: Callable[[BaseException], None] | None

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def ready(self) -> bool: ...
    def active_sequences(self) -> int: ...
    def waiting_sequences(self) -> int: ...
    def kv_cache_usage(self) -> float: ...
    async def tokenize(self, texts: list[str]) -> list[list[int]]: ...
    async def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]: ...
    async def detokenize(self, id_lists: list[list[int]]) -> list[str]: ...
    def generate(
        self, prompt: list[int], options: SamplingOptions, cache_scope: str = ""
    ) -> AsyncGenerator[Delta, None]: ...


class OnnxEngine:
    """Loads one model folder and generates token streams for the serving layer."""

    def __init__(
        self, model_path: Path, config: EngineConfig | None = None, *, on_compile: CompileWatch | None = None
    ) -> None:
        """``on_compile``: told on the owner thread when a client's grammar starts and ends compiling."""
        self.model_path = model_path
        self.config = config or EngineConfig()
        self._on_compile = on_compile
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="onnx-engine-owner", daemon=True)
        self._scheduler: BatchScheduler | None = None
        self._tokenizer: Any = None
        # Tokenising runs in worker threads (off the event loop); the library does not promise it is thread-safe.
        self._tokenizer_lock = threading.Lock()
        self._control_texts: re.Pattern[str] | None = None  # the special tokens' texts (tokenizer.json), at load
        self._model: Any = None
        self._closed = False
        self._loop: DeliveryLoop | None = None
        # Event-loop side: every sequence being generated, so a dying owner thread can still answer each one.
        self._live: set[Job] = set()
        self.failure: BaseException | None = None
        # Called on the event loop if the owner thread dies: the server can no longer generate.
        self.on_failure: Callable[[BaseException], None] | None = None
        self.facts = EngineFacts()

    # ---- lifecycle (event loop side) ---------------------------------------------------

    async def start(self) -> None:
        """Load the model on the owner thread; raise ``ModelLoadingFailed`` with the reason."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.load, loop)

    def load(self, loop: DeliveryLoop) -> None:
        """Load the model on the owner thread and wait for it (blocking); deltas and a death are handed over
        through ``loop``."""
        turn_off_vendor_telemetry()
        self._loop = loop
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise ModelLoadingFailed(f"cannot load model from {self.model_path}: {self._load_error}")

    async def close(self) -> None:
        """Cancel what is in flight, stop the owner thread and release the engine."""
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def shutdown(self) -> None:
        """``close``, blocking: returns once the owner thread has ended every sequence and stopped."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join()

    def ready(self) -> bool:
        """The engine can generate."""
        return self.failure is None and not self._closed

    def active_sequences(self) -> int:
        """Sequences waiting or generating now (0 = the engine is idle)."""
        return self._scheduler.active() if self._scheduler is not None else 0

    def waiting_sequences(self) -> int:
        """Sequences waiting for a batch to start."""
        return self._scheduler.waiting() if self._scheduler is not None else 0

    def kv_cache_usage(self) -> float:
        """The share of the memory budget that running sequences' KV caches hold (0-1)."""
        budget = self.facts.memory.budget_bytes
        if self._scheduler is None or not budget:
            return 0.0
        return self._scheduler.kv_bytes_reserved / budget

    # ---- tokenizer (callable from any thread) ------------------------------------------

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, tokenised off the event loop."""
        return await asyncio.to_thread(lambda: [self.encode(text) for text in texts])

    async def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The conversation's prompt tokens, rendered and tokenised off the event loop."""
        return await asyncio.to_thread(self.encode_chat, messages, tools)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The conversation rendered with the model's template and tokenised, each message's text taken as text:
        a client that types a control token (``<|im_end|>``) gets the characters, not the token, so it cannot fake
        a turn boundary (``chat_text.py``)."""
        controls = self._control_texts
        if controls is None:
            return self.encode(self.apply_chat_template(messages, tools))
        refuse_controls_outside_text(messages, tools, controls)
        if not any(controls.search(str(m.get("content") or "")) for m in messages):
            return self.encode(self.apply_chat_template(messages, tools))
        return encode_contents_as_text(
            messages, controls, render=lambda ms: self.apply_chat_template(ms, tools), encode=self.encode
        )

    async def detokenize(self, id_lists: list[list[int]]) -> list[str]:
        """Each list of token ids (within the vocabulary: the caller checks) as text, off the event loop."""
        return await asyncio.to_thread(lambda: [self.decode(ids) for ids in id_lists])

    def decode(self, ids: list[int]) -> str:
        """Token ids as text (from any thread; calls take turns)."""
        with self._tokenizer_lock:
            return str(self._live_tokenizer().decode(np.asarray(ids, dtype=np.int32)))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model's tokenizer counts them (from any thread; calls take turns)."""
        with self._tokenizer_lock:
            return [int(t) for t in self._live_tokenizer().encode(text)]

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Render the conversation, and the tools if any, with the model's template (a Phi-3-style one when it has
        none)."""
        template = None if self.facts.has_chat_template else FALLBACK_CHAT_TEMPLATE
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

    # ---- generation --------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Hand a sequence to the owner thread (from any thread); its deltas go to ``job.queue``."""
        scheduler = self._scheduler
        assert scheduler is not None, "start() the engine first"
        self._commands.put(lambda: scheduler.submit(job))

    def cancel(self, job: Job) -> None:
        """Stop a sequence at the owner thread's next round (from any thread)."""
        scheduler = self._scheduler
        if scheduler is not None:
            self._commands.put(lambda: scheduler.cancel(job))

    async def generate(
        self, prompt: list[int], options: SamplingOptions, cache_scope: str = ""
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one sequence; closing the iterator early cancels the sequence. Its KV cache, kept for
        a conversation's next turn, is continued only by a sequence of the same ``cache_scope``."""
        if self.failure is not None:
            raise EngineFailure("the engine has failed; the server is restarting")
        if self._closed:
            raise ShuttingDown("The server is shutting down; no new generation starts")
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        job = Job(np.asarray(prompt, dtype=np.int32), options, asyncio.get_running_loop(), deltas, cache_scope)
        self._live.add(job)
        self.submit(job)
        read = read_deltas(deltas, done=lambda: self._live.discard(job), abandoned=lambda: self.cancel(job))
        async with contextlib.aclosing(read) as stream:
            async for delta in stream:
                yield delta

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
        context_length = _context_length(genai_config, self.config.max_model_len)
        vocab_size = int(genai_config["model"].get("vocab_size", 0))
        memory = _kv_budget(genai_config, context_length, self.config.memory_budget_mb)
        config = og.Config(str(self.model_path))
        # search.max_length caps every sequence (the scheduler sizes each request's cache within it, and a client's
        # context is its limit, not the model's 128k, say).
        # Unless told, the session runs one intra-op thread: on a 2-core box the second core idled (the bare Engine
        # decoded at 37.8 tok/s with one thread, 67.1 with two). The overlay sets it without touching the folder.
        threads = self.config.threads or usable_cpus()
        config.overlay(
            json.dumps(
                {
                    "engine": {"static_batching": {"max_batch_size": self.config.max_batch_size}},
                    "search": {"max_length": context_length},
                    "model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}},
                }
            )
        )
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self._control_texts = control_texts(self.model_path)
        template = _chat_template(self.model_path)
        self.facts = EngineFacts(
            context_length=context_length,
            max_token_bytes=_max_token_bytes(self._tokenizer, vocab_size),
            vocab_size=vocab_size,
            threads=threads,
            memory=memory,
            eos_token_ids=frozenset(int(t) for t in self._tokenizer.eos_token_ids),
            bos_token_id=_bos(self._tokenizer),
            has_chat_template=template is not None,
            chat_template=template or FALLBACK_CHAT_TEMPLATE,
        )
        return BatchScheduler(
            self._model,
            self._tokenizer,
            lanes=self.config.lanes,
            eos_token_ids=self.facts.eos_token_ids,
            max_batch_size=self.config.max_batch_size,
            batch_wait_s=self.config.batch_wait_ms / 1000,
            memory=memory,
            prefix_cache=self.config.prefix_cache,
            stream_interval=self.config.stream_interval,
            shares_server_gil=self.config.shares_server_gil,
            byte_table=byte_table(self.model_path),
            on_compile=self._on_compile,
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


def usable_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use: those its affinity allows, at most its cgroup's CPU quota (``cpu.max``,
    rounded up). In a pod or under ``docker run --cpus 8`` the affinity mask is every core of the node: a quota of
    8 on a 64-core node ran 64 threads, each throttled. The cgroup is this process's own (cgroup v2: a systemd
    unit's ``CPUQuota=`` too)."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        folder = cgroup if cgroup is not None else _own_cgroup()
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def _own_cgroup() -> Path:
    """This process's cgroup v2 folder (``0::/path`` in /proc/self/cgroup); the root in a container's namespace."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return Path("/sys/fs/cgroup")


def default_memory_budget_bytes() -> int:
    """Half of the memory this process may use: the cgroup's limit (a container's) or the machine's RAM. The
    other half is for the weights, the runtime's buffers and the rest of the server."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total // 2


def _bos(tokenizer: Any) -> int | None:
    """The tokenizer's beginning-of-sequence token, if it has one (the runtime says -1 when not)."""
    bos = int(getattr(tokenizer, "bos_token_id", -1))
    return bos if bos >= 0 else None


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
