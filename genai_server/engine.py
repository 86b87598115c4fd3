"""The embedded ONNX Runtime GenAI engine, driven from one owner thread.

Why a thread of its own running the Engine API: ``og.Engine.run()`` releases
the GIL, so the event loop keeps serving while tokens are generated (measured
with ``benchmarks/loop_lateness.py``: loop lateness p99 0.17 ms with the Engine
against 12.7 ms, max 434 ms, with the Generator API, at the same tokens/s).
Every Engine call must come from the thread that created it, so that thread
owns the model, the Engine and every request; the event loop talks to it only
through a command queue, and it answers only with ``loop.call_soon_threadsafe``.

On CPU the Engine batches statically and refuses per-request seeds, so a
sampled request with a ``seed`` runs on a seeded ``og.Generator`` stepped by
the same thread between Engine steps (its prefill is fed in chunks to bound
how long it holds the GIL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime_genai as og

from genai_server.errors import EngineFailure, ModelLoadingFailed

log = logging.getLogger(__name__)

EngineFinish = Literal["stop", "length", "cancelled"]

# Prefill of a seeded Generator request is fed in chunks of this many tokens:
# each append holds the GIL, and 64 tokens keeps one stall to tens of ms.
_PREFILL_CHUNK = 64
_EVENT_BUFFER = 256

# A Phi-3-style template for models that ship none (the runtime raises "Empty chat template").
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence is generated. ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when no sampling is needed."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class Delta:
    """Tokens the engine produced for one sequence since the last delta."""

    text: str
    tokens: int
    finish: EngineFinish | None = None
    error: str | None = None


@dataclass(eq=False)  # identity, not field equality: jobs hold numpy arrays
class _Job:
    """One sequence in flight; its fields other than ``queue``/``loop`` belong to the owner thread."""

    prompt: np.ndarray
    options: SamplingOptions
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta]
    request: Any = None
    turn_id: int = 0
    generator: Any = None
    stream: Any = None
    fed: int = 0
    generated: int = 0
    done: bool = False
    pending_text: list[str] = field(default_factory=list)

    def send(self, delta: Delta) -> None:
        """Hand a delta to the event loop (asyncio.Queue is not thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)


class OnnxEngine:
    """Loads one model folder and generates token streams for the serving layer."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._jobs: dict[int, _Job] = {}
        self._generator_jobs: list[_Job] = []
        self._thread = threading.Thread(target=self._thread_main, name="onnx-engine-owner", daemon=True)
        self.context_length = 0
        self.eos_token_ids: frozenset[int] = frozenset()
        self.has_chat_template = False

    # ---- lifecycle (event loop side) ---------------------------------------------------

    async def start(self) -> None:
        """Load the model on the owner thread; raise ``ModelLoadingFailed`` with the reason."""
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
        """Sequences the owner thread is generating now (0 = the engine is idle)."""
        return len(self._jobs) + len(self._generator_jobs)

    # ---- tokenizer (callable from any thread) ------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model's tokenizer counts them."""
        return [int(t) for t in self._tokenizer.encode(text)]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render the conversation with the model's template (a Phi-3-style one when it has none)."""
        template = None if self.has_chat_template else FALLBACK_CHAT_TEMPLATE
        return str(self._tokenizer.apply_chat_template(json.dumps(messages), template_str=template,
                                                       add_generation_prompt=True))

    # ---- generation (event loop side) --------------------------------------------------

    async def generate(self, prompt: list[int], options: SamplingOptions) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one sequence; closing the iterator early cancels the sequence."""
        job = _Job(np.asarray(prompt, dtype=np.int32), options, asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(lambda: self._submit(job))
        finished = False
        try:
            while not finished:
                delta = await job.queue.get()
                finished = delta.finish is not None or delta.error is not None
                if delta.error is not None:
                    raise EngineFailure("the engine failed to generate a response")
                yield delta
        finally:
            if not finished:
                self._commands.put(lambda: self._cancel(job))

    # ---- owner thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to start() and re-raised there
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve()
        finally:
            self._shutdown()

    def _load(self) -> None:
        if not (self.model_path / "genai_config.json").is_file():
            raise FileNotFoundError(f"no genai_config.json in {self.model_path}")
        self._model = og.Model(str(self.model_path))
        self._tokenizer = og.Tokenizer(self._model)
        self._engine = og.Engine(self._model)
        self._events = self._engine.create_event_buffer(_EVENT_BUFFER)
        config = json.loads((self.model_path / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_token_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self.has_chat_template = _has_chat_template(self.model_path)

    def _serve(self) -> None:
        while True:
            busy = self._engine.has_pending_requests() or bool(self._generator_jobs)
            if not self._drain_commands(block=not busy):
                return
            if self._engine.has_pending_requests():
                self._guarded(self._step_engine, list(self._jobs.values()))
            for job in list(self._generator_jobs):
                self._guarded(lambda job=job: self._step_generator(job), [job])  # type: ignore[misc]

    def _guarded(self, step: Callable[[], None], jobs: list[_Job]) -> None:
        """Run one step; if the engine raises, fail the jobs it concerned and keep serving the rest."""
        try:
            step()
        except Exception as exc:
            log.exception("engine step failed")
            for job in jobs:
                if not job.done:
                    self._cancel(job)
                    job.send(Delta("", 0, error=str(exc)))

    def _drain_commands(self, *, block: bool) -> bool:
        """Run queued commands; False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _submit(self, job: _Job) -> None:
        job.stream = self._tokenizer.create_stream()
        try:
            if job.options.seed is not None and not job.options.greedy:
                self._start_generator(job)
            else:
                self._start_request(job)
        except Exception as exc:
            log.exception("engine rejected a request")
            job.send(Delta("", 0, error=str(exc)))

    def _start_request(self, job: _Job) -> None:
        request = self._engine.create_request()
        opts = og.TurnOptions(request)
        opts.set_max_generated_tokens(job.options.max_tokens)
        opts.set_do_sample(not job.options.greedy)
        if not job.options.greedy:
            opts.set_temperature(job.options.temperature)
            opts.set_top_p(job.options.top_p)
            opts.set_top_k(job.options.top_k)
        job.request = request
        job.turn_id = request.begin_turn(job.prompt, opts)
        self._jobs[id(request)] = job

    def _start_generator(self, job: _Job) -> None:
        params = og.GeneratorParams(self._model)
        params.set_search_options(
            max_length=len(job.prompt) + job.options.max_tokens, do_sample=True,
            temperature=job.options.temperature, top_p=job.options.top_p, top_k=job.options.top_k,
            random_seed=job.options.seed,
        )
        job.generator = og.Generator(self._model, params)
        self._generator_jobs.append(job)

    def _cancel(self, job: _Job) -> None:
        if job.done:
            return
        job.done = True
        if job.request is not None:
            job.request.cancel_turn(job.turn_id)
            self._forget(job)
        elif job in self._generator_jobs:
            self._generator_jobs.remove(job)
            job.generator = None

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(id(job.request), None)
        job.request.close()

    def _step_engine(self) -> None:
        touched: dict[int, _Job] = {}
        for event in self._engine.run(self._events):
            job = self._jobs.get(id(event.request))
            if job is None or job.done:
                continue
            touched[id(job)] = job
            self._on_event(job, event)
        for job in touched.values():
            self._flush(job)

    def _on_event(self, job: _Job, event: Any) -> None:
        flags = event.flags
        if flags & og.EngineEventFlags.TOKEN:
            job.generated += 1
            job.pending_text.append(job.stream.decode(event.token))
        if flags & og.EngineEventFlags.FAILED:
            log.error("engine failed a request: %s", event.error_code)
            self._finish(job, error=str(event.error_code))
        elif flags & og.EngineEventFlags.TURN_FINISHED:
            self._finish(job, finish=_finish_reason(event.finish_reason))

    def _finish(self, job: _Job, *, finish: EngineFinish | None = None, error: str | None = None) -> None:
        job.done = True
        job.send(Delta("".join(job.pending_text), job.generated, finish=finish, error=error))
        job.pending_text.clear()
        job.generated = 0
        if job.request is not None:
            self._forget(job)

    def _flush(self, job: _Job) -> None:
        if job.done or not job.generated:
            return
        job.send(Delta("".join(job.pending_text), job.generated))
        job.pending_text.clear()
        job.generated = 0

    def _step_generator(self, job: _Job) -> None:
        gen = job.generator
        if job.fed < len(job.prompt):
            gen.append_tokens(job.prompt[job.fed: job.fed + _PREFILL_CHUNK])
            job.fed += _PREFILL_CHUNK
            return
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in self.eos_token_ids:  # not counted, as the Engine API does not count it
            self._end_generator(job, "stop")
            return
        job.generated += 1
        job.pending_text.append(job.stream.decode(token))
        if gen.is_done():
            self._end_generator(job, "length")
        else:
            self._flush(job)

    def _end_generator(self, job: _Job, finish: EngineFinish) -> None:
        self._generator_jobs.remove(job)
        job.generator = None
        self._finish(job, finish=finish)

    def _shutdown(self) -> None:
        for job in list(self._jobs.values()) + self._generator_jobs:
            self._cancel(job)
            job.send(Delta("", 0, finish="cancelled"))
        while self._engine.has_pending_requests():
            self._engine.run(self._events)
        del self._engine, self._tokenizer, self._model


def _finish_reason(reason: Any) -> EngineFinish:
    if reason == og.FinishReason.CANCELLED:
        return "cancelled"
    if reason in (og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS):
        return "length"
    return "stop"


def _has_chat_template(model_path: Path) -> bool:
    if (model_path / "chat_template.jinja").is_file():
        return True
    config_file = model_path / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    return bool(json.loads(config_file.read_text()).get("chat_template"))
