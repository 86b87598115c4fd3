"""The batching scheduler: owner-thread-only code that shares the model between concurrent sequences.

On CPU, ONNX Runtime GenAI's Engine batches statically: a request that arrives
while a batch runs waits until the whole batch has finished. To avoid that wait
the scheduler keeps several Engines ("lanes") on the one model and steps them in
turn: waiting sequences are admitted together, as one batch, into a lane that is
idle, so a newcomer starts within one decode step of the batches already running
unless every lane is busy. What the CPU Engine cannot do (seeded sampling needs
dynamic batching; a minimum length and logprobs need the logits) is stepped on a
Generator of its own, which holds the GIL while it computes (``logprobs.py``).

Prefix reuse (``prefix_cache.py``) needs a KV cache that can be cut anywhere, which only a Generator has. So a
sequence that would run alone, and a conversation whose prompt outweighs its reply (``_worth_keeping``: its next
turn's saved prefill is worth more than batching its few decode steps), runs on a Generator that is kept when it
ends; a later prompt that shares a long enough prefix with a kept one (the next turn, the same prompt again, the
same document or system prompt) rewinds it and prefills only the rest. At most ``lanes`` batches and
``prefix_cache`` kept Generators run at once. Kept sequences are dropped least recently used first, when there are
more than ``prefix_cache`` of them or when running work needs their memory: they never make new work wait.

Memory is admitted, not hoped for: each running sequence holds a KV cache sized when it starts, for its prompt
plus ``max_tokens`` rounded up to a multiple of 256 tokens (``KvBudget.capacity``; a sequence that is kept gets
room for its conversation to grow), and the sum stays within the engine's memory budget. Work beyond it waits in
line; a context whose one sequence could never fit is refused when the engine starts.

Nothing here may be called from any thread but the engine's owner thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime_genai as og

from genai_server.embedded.detokenize import ByteStream, RuntimeStream, TextStream
from genai_server.embedded.logprobs import TokenLogprob, token_logprob
from genai_server.embedded.prefix_cache import Kept, Reuse, best_reuse

log = logging.getLogger(__name__)

EngineFinish = Literal["stop", "length", "cancelled"]

# Prefill of a Generator sequence is fed in chunks of this many tokens: each append holds the GIL, and 64 tokens
# keeps one stall of the server's event loop to tens of ms. When the GIL is the engine process's own, a stall holds
# up nobody: 256-token chunks measured 1.03x the Engine's whole-prompt prefill where 64 gave 0.955x (1150 tokens,
# 0.42B model). A last chunk is never a single token: that one would take the decode path (``prefix_cache.py``).
PREFILL_CHUNK = 64
_OWN_GIL_PREFILL_CHUNK = 256
_EVENT_BUFFER = 256
# What the grammar parser starts its errors with, inside the engine's; and how much of one a client is shown.
_PARSER_ERROR = "Parser Error:"
_GRAMMAR_FAILED = "the engine failed while following it (its parser allows at most 2000 alternatives at a point)"
# The failures after which an Engine is not trusted again (the runtime may have declared it unhealthy).
_ENGINE_FAULTS = frozenset({og.EngineErrorCode.ENGINE_EXECUTION_FAILURE, og.EngineErrorCode.ENGINE_CONTRACT_FAILURE})
_GRAMMAR_MESSAGE_CHARS = 300
# KV caches are sized in steps of this many tokens. Measured (0.42B model, 8 sequences of 35 + 48 tokens): the
# cache is allocated when a batch starts, at the size the request was created with, and a sequence sized 256 added
# 9 MB of RSS where one sized for the whole 4096-token context added 55 MB. A static batch gives every sequence the
# size of its largest: one request of 2048 tokens with seven of 256 added 199 MB, eight of 2048 200 MB.
_CACHE_STEP = 256
# A conversation runs alone, to be kept for its next turn, when its prompt is at least this long and at least
# _KEEP_PROMPT_RATIO times its reply's token limit (counted at most _KEEP_REPLY_CAP: a client that sets no
# max_tokens gets the rest of the context as its limit). Measured on the 0.42B model: prefill runs at ~270 tokens/s,
# and a sequence decoding alone instead of in a batch of 4 costs ~6 ms more per token (73 against 132 tokens/s), so
# a prompt longer than about 1.6 times the reply saves more on the next turn than batching its reply saves now.
_KEEP_MIN_PROMPT = 256
_KEEP_PROMPT_RATIO = 2
_KEEP_REPLY_CAP = 512
_OUT_OF_MEMORY = "compiling it needs more memory than the engine may use"


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence is generated. ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    guidance: tuple[str, str] | None = None  # (kind, data) for TurnOptions.set_guidance, e.g. a JSON schema
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # the end-of-sequence token is not allowed before this many tokens
    logprobs: int | None = None  # report each token's log probability and this many alternatives; None: off

    @property
    def greedy(self) -> bool:
        """True when no sampling is needed."""
        return self.temperature == 0.0

    @property
    def generator_settings(self) -> tuple[Any, ...]:
        """What a Generator samples with, fixed when it is made: a kept one serves only sequences with the same."""
        if self.greedy:
            return (True, self.repetition_penalty)
        return (False, self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    @property
    def keepable(self) -> bool:
        """A plain sequence (no seed, grammar, minimum length or logprobs) may run on a Generator that is kept."""
        return not self.needs_generator and self.guidance is None

    @property
    def needs_generator(self) -> bool:
        """What the CPU Engine cannot do: seeded sampling (it needs dynamic batching), a minimum length, logits."""
        return (self.seed is not None and not self.greedy) or self.min_tokens > 0 or self.logprobs is not None


class GuidanceRejected(Exception):
    """The engine could not build the grammar a sequence asked for (a schema it cannot compile): the request's
    fault, not the engine's."""


@dataclass(frozen=True)
class Delta:
    """Tokens the engine produced for one sequence since the last delta."""

    text: str
    tokens: int
    finish: EngineFinish | None = None
    error: str | None = None
    admitted_at: float | None = None  # perf_counter() when the sequence left the queue, once known
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not prefilled again
    rejected: str | None = None  # with ``error``: why the engine refused the sequence's guidance
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the sequence asked for them


class DeltaSink(Protocol):
    """Where a sequence's deltas go: an ``asyncio.Queue``, or the engine process's pipe back to the server."""

    def put_nowait(self, item: Delta, /) -> None: ...


class DeliveryLoop(Protocol):
    """What runs the hand-over of a round's deltas: an event loop, or (in the engine process) the owner thread
    itself."""

    def call_soon_threadsafe(self, callback: Callable[..., object], /, *args: Any) -> Any: ...


# Told before a sequence's grammar compiles (its guidance) and after (None): the engine process reports it, so that
# a grammar that kills the process while compiling is known and refused the next time (``engine_process.py``).
CompileWatch = Callable[[tuple[str, str] | None], None]


def guidance_fingerprint(guidance: tuple[str, str]) -> str:
    """A grammar's identity: the same kind and text, the same fingerprint; a JSON schema is taken in a canonical
    form (keys sorted, no spacing), so that reordering its keys does not make it another."""
    kind, data = guidance
    if kind == "json_schema":
        with contextlib.suppress(ValueError):
            data = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{kind}\0{data}".encode()).hexdigest()


@dataclass(eq=False)  # identity, not field equality: jobs hold numpy arrays
class Job:
    """One sequence; ``queue`` and ``loop`` belong to the event loop, the rest to the owner thread."""

    prompt: np.ndarray
    options: SamplingOptions
    loop: DeliveryLoop
    queue: DeltaSink
    scope: str = ""  # whose conversation it is: a kept sequence is continued only within its scope
    lane: Lane | None = None
    admitted_at: float | None = None
    request: Any = None
    turn_id: int = 0
    generator: Any = None
    kv_bytes: int = 0  # a Generator's KV cache, reserved while it runs
    capacity: int = 0  # the tokens its KV cache is sized for (``KvBudget.capacity``)
    keep: bool = False  # runs on a Generator that is kept when it ends, for a prompt that shares its prefix
    cached_tokens: int = 0  # prompt tokens reused from a kept sequence, not prefilled again
    delivered: bool = False  # its first tokens have been handed over
    stream: TextStream = field(default_factory=lambda: RuntimeStream(None))  # set when queued
    fed: int = 0
    generated: int = 0  # tokens not yet handed over
    sampled: int = 0  # tokens a Generator sequence has sampled in all
    done: bool = False
    pending_text: list[str] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


def _deliver(items: list[tuple[DeltaSink, Delta]]) -> None:
    """On the event loop: put each delta in its sequence's queue."""
    for target, delta in items:
        target.put_nowait(delta)


@dataclass(frozen=True)
class KvBudget:
    """What running sequences may hold in KV cache, and what each costs."""

    budget_bytes: int
    bytes_per_token: int
    context_length: int

    def capacity(self, tokens: int, *, grows: bool = False) -> int:
        """The cache a sequence that needs ``tokens`` (prompt and max_tokens) is created with: the next multiple of
        256 tokens, at most the context. One that is kept (``grows``) gets twice that, so that a conversation's next
        turns fit in it: a kept cache cannot be enlarged, and a turn too long for it is prefilled whole again (into
        a cache twice as large, when it is kept too)."""
        wanted = max(1, tokens * (2 if grows else 1))
        return min(-(-wanted // _CACHE_STEP) * _CACHE_STEP, self.context_length)

    def sequence_bytes(self, capacity: int) -> int:
        """What a sequence of ``capacity`` tokens holds (an Engine allocates it when its batch starts)."""
        return self.bytes_per_token * capacity

    def generator_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """A Generator: its cache holds the prompt and max_tokens."""
        return self.bytes_per_token * min(self.context_length, prompt_tokens + max_tokens)


class Lane:
    """One og.Engine: a static batch of sequences that start together. Engines are cheap (the KV cache is allocated
    per batch), so lanes are made as needed."""

    def __init__(self, model: Any) -> None:
        self.engine = og.Engine(model)
        self.events = self.engine.create_event_buffer(_EVENT_BUFFER)
        self.jobs: dict[int, Job] = {}  # by id() of the og.Request
        self.kv_bytes = 0  # the batch's KV cache, reserved while it runs
        self.failed = False  # the Engine failed a request in a way that may have left it unusable

    @property
    def idle(self) -> bool:
        """No batch is running."""
        return not self.jobs and not self.engine.has_pending_requests()


class BatchScheduler:
    """Admits sequences into lanes and steps every lane and Generator in turn."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        lanes: int,
        eos_token_ids: frozenset[int],
        max_batch_size: int,
        batch_wait_s: float,
        memory: KvBudget,
        prefix_cache: int = 0,
        stream_interval: int = 1,
        shares_server_gil: bool = False,
        byte_table: list[bytes] | None = None,
        on_compile: CompileWatch | None = None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._byte_table = byte_table  # every token's bytes (``detokenize.py``); None: the runtime's stream
        self._lanes = [Lane(model) for _ in range(lanes)]
        self._max_running = lanes
        self._max_kept = prefix_cache
        self._stream_interval = stream_interval
        # A Generator holds the GIL for each step. When that GIL is the server's (the engine in its process), its
        # prefill goes in small chunks, and a sequence alone in its batch stays on the Engine instead of a kept
        # Generator: every lone request would stall the event loop.
        self._prefill_chunk = PREFILL_CHUNK if shares_server_gil else _OWN_GIL_PREFILL_CHUNK
        self._lone_kept = not shares_server_gil
        self._eos = eos_token_ids
        self._max_batch = max_batch_size
        self._batch_wait_s = batch_wait_s
        self._waiting: deque[Job] = deque()
        self._last_arrival = 0.0
        self._generators: list[Job] = []
        self._waiting_generators: deque[Job] = deque()
        self._kept: list[Kept] = []  # finished Generators, their caches resident
        self._memory = memory
        # The KV bytes reserved after the last round: what other threads read as a gauge.
        self.kv_bytes_reserved = 0
        # Deltas of one round go to the event loop in one call_soon_threadsafe per loop, not one per
        # sequence: each call wakes the loop thread, which competes with the engine for the cores.
        self._outbox: dict[DeliveryLoop, list[tuple[DeltaSink, Delta]]] = {}
        self._on_compile = on_compile

    # ---- what the owner thread loop asks ----------------------------------------------

    def wait_timeout(self) -> float | None:
        """How long the owner thread may wait for commands: None = until one comes (idle),
        0 = not at all (something is generating), else the seconds until waiting sequences are admitted."""
        if self._generators or self._waiting_generators or any(not lane.idle for lane in self._lanes):
            return 0.0
        if self._waiting:
            return max(0.0, self._admission_time() - time.monotonic())
        return None

    def active(self) -> int:
        """Sequences admitted or waiting (read from other threads only as a rough gauge)."""
        return self.waiting() + len(self._generators) + sum(len(lane.jobs) for lane in self._lanes)

    def waiting(self) -> int:
        """Sequences not yet admitted (a rough gauge from other threads)."""
        return len(self._waiting) + len(self._waiting_generators)

    def _kv_bytes_in_use(self) -> int:
        """KV-cache bytes reserved by running batches, kept sequences and Generators (asks the Engines: owner
        thread only)."""
        lanes = sum(lane.kv_bytes for lane in self._lanes if not lane.idle)
        return lanes + sum(j.kv_bytes for j in self._generators) + self._kept_bytes()

    def _kept_bytes(self) -> int:
        return sum(kept.kv_bytes for kept in self._kept)

    def step(self) -> None:
        """One round: admit waiting sequences, then one step of every busy lane and Generator."""
        if self._waiting:  # what runs alone does not wait for a batch to gather
            self._admit_reuse()
            # Only from the head of the line: a newcomer never takes memory that older work is waiting for.
            while self._waiting and self._worth_keeping(self._waiting[0]) and self._start_kept(self._waiting[0]):
                pass
        if self._waiting and (len(self._waiting) >= self._max_batch or time.monotonic() >= self._admission_time()):
            self._admit()
        self._admit_generators()
        for lane in list(self._lanes):
            if not lane.engine.has_pending_requests():
                continue
            stepped = self._guarded(partial(self._step_lane, lane), list(lane.jobs.values()))
            if not stepped or lane.failed:
                self._fail(list(lane.jobs.values()), "the engine failed", grammar=False)
                self._replace(lane)
        for job in list(self._generators):
            self._guarded(partial(self._step_generator, job), [job])
        # Kept sequences are left out: like vLLM's cached free blocks, they give way to any new work.
        self.kv_bytes_reserved = self._kv_bytes_in_use() - self._kept_bytes()

    # ---- commands ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a sequence; it starts at the next admission."""
        self._guarded(partial(self._queue, job), [job])

    def _queue(self, job: Job) -> None:
        job.stream = (
            ByteStream(self._byte_table) if self._byte_table else RuntimeStream(self._tokenizer.create_stream())
        )
        if job.options.needs_generator:
            self._waiting_generators.append(job)
        else:
            self._waiting.append(job)
            self._last_arrival = time.monotonic()

    def cancel(self, job: Job) -> None:
        """Stop a sequence now and free what it holds. Never raises: it runs on error paths too."""
        if job.done:
            return
        job.done = True
        if job.request is not None:
            try:
                job.request.cancel_turn(job.turn_id)
            except Exception:  # e.g. its turn never began; the request is closed below anyway
                log.debug("cancel_turn failed", exc_info=True)
            self._release(job)
        elif job in self._generators:
            self._generators.remove(job)
            job.generator = None
        elif job in self._waiting:
            self._waiting.remove(job)
        elif job in self._waiting_generators:
            self._waiting_generators.remove(job)

    def shutdown(self) -> None:
        """Cancel everything (each client is told), drain the engines and let go of them."""
        jobs = [
            *self._waiting,
            *self._waiting_generators,
            *self._generators,
            *(j for lane in self._lanes for j in lane.jobs.values()),
        ]
        for job in jobs:
            self.cancel(job)
            self._send(job, Delta("", 0, finish="cancelled"))
        for lane in self._lanes:
            while lane.engine.has_pending_requests():
                lane.engine.run(lane.events)
        self._lanes.clear()
        self._kept.clear()

    # ---- lanes ------------------------------------------------------------------------

    def _admission_time(self) -> float:
        """Clients of one burst arrive a few ms apart; a static batch cannot take latecomers, so a
        batch starts once no one has arrived for ``batch_wait_s`` (or it is full)."""
        return self._last_arrival + self._batch_wait_s

    def _free_kv_bytes(self) -> int:
        return self._memory.budget_bytes - self._kv_bytes_in_use()

    def _make_room(self, needed: int) -> int:
        """Free KV bytes after dropping kept sequences, least recently used first, until ``needed`` fit; none is
        dropped when even all of them would not make room."""
        free = self._free_kv_bytes()
        if free + self._kept_bytes() < needed:
            return free
        for kept in self._kept_lru():
            if free >= needed:
                break
            self._kept.remove(kept)
            free = self._free_kv_bytes()
        return free

    def _kept_lru(self) -> list[Kept]:
        """Kept sequences, least recently used first: the order they are dropped in."""
        return sorted(self._kept, key=lambda kept: kept.used_at)

    def _replace(self, lane: Lane) -> None:
        """An Engine whose step raised is never used again: the runtime may have declared it "no longer healthy"
        (measured: a grammar past its parser's row limit while tokens are committed), after which every request on
        it fails. Its sequences were failed by ``_guarded``; a fresh Engine takes its place (Engines are cheap: the KV
        cache is allocated per batch)."""
        self._lanes[self._lanes.index(lane)] = Lane(self._model)
        log.warning("an engine lane failed and was replaced by a new one")

    def _running(self) -> int:
        return sum(not lane.idle for lane in self._lanes)

    def _running_kept(self) -> int:
        return sum(job.keep for job in self._generators)

    def _capacity(self, job: Job, *, keep: bool) -> int:
        return self._memory.capacity(len(job.prompt) + job.options.max_tokens, grows=keep)

    def _worth_keeping(self, job: Job) -> bool:
        """Whether ``job`` saves more by being kept for its conversation's next turn than by sharing a batch now."""
        prompt = len(job.prompt)
        reply = min(job.options.max_tokens, _KEEP_REPLY_CAP)
        return self._keepable(job) and prompt >= _KEEP_MIN_PROMPT and prompt >= _KEEP_PROMPT_RATIO * reply

    def _keepable(self, job: Job) -> bool:
        return self._max_kept > 0 and job.options.keepable

    def _free_lane(self) -> Lane:
        """An Engine with no batch running; a new one if every lane runs."""
        for lane in self._lanes:
            if lane.idle:
                return lane
        lane = Lane(self._model)
        self._lanes.append(lane)
        return lane

    def _admit(self) -> None:
        """Once a burst has gathered: a sequence that would be alone in its batch starts on a Generator of its own
        that is kept when it ends; the rest as one batch per lane. (Those that share a long enough prefix with a
        kept sequence, and conversations worth keeping, started on arrival.)"""
        if len(self._waiting) == 1 and self._lone_kept and self._keepable(self._waiting[0]):
            self._start_kept(self._waiting[0])
        while self._waiting and self._running() < self._max_running:
            batch = self._fitting_batch()
            if not batch:
                return  # the budget is full: wait for a batch or a Generator to end
            lane = self._free_lane()
            lane.kv_bytes = sum(self._memory.sequence_bytes(job.capacity) for job in batch)
            for job in batch:
                self._guarded(partial(self._begin, job, lane), [job])

    def _fitting_batch(self) -> list[Job]:
        """The longest run of waiting sequences (up to a batch) whose caches fit the budget, taken off the queue.
        A static batch sizes every sequence's cache for its largest one, so that is what each is given and costs."""
        capacities = [self._capacity(job, keep=False) for job in itertools.islice(self._waiting, self._max_batch)]
        costs = [self._memory.sequence_bytes(max(capacities[: n + 1])) * (n + 1) for n in range(len(capacities))]
        reachable = self._free_kv_bytes() + self._kept_bytes()
        free = self._make_room(max((cost for cost in costs if cost <= reachable), default=0))
        size = sum(1 for cost in costs if cost <= free)  # costs grow with the batch
        batch = [self._waiting.popleft() for _ in range(size)]
        for job in batch:
            job.capacity = max(capacities[:size])
        return batch

    def _admit_reuse(self) -> None:
        # Not limited by how many kept sequences run: a reused one needs no memory it did not hold.
        for job in list(self._waiting):
            if not self._kept:
                return
            if not self._keepable(job):
                continue
            options = job.options
            reuse = best_reuse(
                job.prompt,
                self._kept,
                scope=job.scope,
                sampling=options.generator_settings,
                max_tokens=options.max_tokens,
            )
            if reuse is not None:
                self._kept.remove(reuse.kept)
                self._waiting.remove(job)
                self._guarded(partial(self._resume, job, reuse), [job])

    def _resume(self, job: Job, reuse: Reuse) -> None:
        """Run ``job`` on a kept Generator, cut back to the prefix they share: only the rest is prefilled."""
        kept = reuse.kept
        job.keep, job.capacity, job.kv_bytes = True, kept.capacity, kept.kv_bytes
        job.generator = kept.generator
        job.fed = job.cached_tokens = reuse.tokens
        job.admitted_at = time.perf_counter()
        self._generators.append(job)
        job.generator.rewind_to(reuse.tokens)

    def _start_kept(self, job: Job) -> bool:
        """Start ``job`` on a Generator of its own that is kept when it ends, if fewer than ``prefix_cache`` run so
        and its cache fits; otherwise it stays in line for a batch (False)."""
        if self._running_kept() >= self._max_kept:
            return False
        capacity = self._capacity(job, keep=True)
        cost = self._memory.sequence_bytes(capacity)
        if cost > self._make_room(cost):
            return False
        self._waiting.remove(job)
        job.keep, job.capacity, job.kv_bytes = True, capacity, cost
        self._guarded(partial(self._start_generator, job), [job])
        return True

    def _admit_generators(self) -> None:
        """Start waiting Generators in arrival order while their KV caches fit (the first that does not fit
        waits, and so do those behind it: a large one is not starved by small ones)."""
        while self._waiting_generators:
            job = self._waiting_generators[0]
            cost = self._memory.generator_bytes(len(job.prompt), job.options.max_tokens)
            if cost > self._make_room(cost):
                return
            self._waiting_generators.popleft()
            job.kv_bytes = cost
            self._guarded(partial(self._start_generator, job), [job])

    def _begin(self, job: Job, lane: Lane) -> None:
        """Start ``job`` on ``lane``, in the batch that starts there now."""
        # Its cache is allocated at this size when the batch starts, and cannot grow (``KvBudget.capacity``).
        sizing = og.RequestOptions()
        sizing.set_max_session_tokens(job.capacity)
        request = lane.engine.create_request(options=sizing)
        opts = og.TurnOptions(request)
        opts.set_max_generated_tokens(job.options.max_tokens)
        opts.set_do_sample(not job.options.greedy)
        if job.options.repetition_penalty != 1.0:
            opts.set_repetition_penalty(job.options.repetition_penalty)
        if not job.options.greedy:
            opts.set_temperature(job.options.temperature)
            opts.set_top_p(job.options.top_p)
            opts.set_top_k(job.options.top_k)
        try:
            with self._compiling(job.options):
                if job.options.guidance is not None:
                    opts.set_guidance(*job.options.guidance)
                job.turn_id = request.begin_turn(job.prompt, opts)
        except BaseException:
            _close(request)  # its turn never began: nothing to cancel, only to free
            raise
        job.lane, job.request, job.admitted_at = lane, request, time.perf_counter()
        lane.jobs[id(request)] = job

    def _step_lane(self, lane: Lane) -> None:
        touched: dict[int, Job] = {}
        for event in lane.engine.run(lane.events):
            if event.flags & og.EngineEventFlags.FAILED and event.error_code in _ENGINE_FAULTS:
                lane.failed = True  # replaced after this step: the runtime may call the Engine unhealthy now
            job = lane.jobs.get(id(event.request))
            if job is None or job.done:
                continue
            touched[id(job)] = job
            self._on_event(job, event)
        for job in touched.values():
            self._flush(job)

    def _on_event(self, job: Job, event: Any) -> None:
        flags = event.flags
        if flags & og.EngineEventFlags.TOKEN:
            job.generated += 1
            job.pending_text.append(job.stream.decode(event.token))
        if flags & og.EngineEventFlags.FAILED:
            if job.options.guidance is not None and event.error_code in _ENGINE_FAULTS:
                # Measured: a grammar past the parser's row limit fails its sequence while tokens are committed,
                # and the runtime says so only on stderr. A guided sequence that fails so is the grammar's fault.
                log.info("a guided sequence failed while its tokens were committed: %s", event.error_code)
                self._fail([job], _GRAMMAR_FAILED, grammar=True)
                return
            log.error("engine failed a request: %s", event.error_code)
            self._finish(job, error=str(event.error_code))
        elif flags & og.EngineEventFlags.TURN_FINISHED:
            self._finish(job, finish=_finish_reason(event.finish_reason))

    def _release(self, job: Job) -> None:
        """Free what a finished or cancelled lane sequence holds."""
        if job.lane is not None:
            job.lane.jobs.pop(id(job.request), None)
        _close(job.request)
        job.request = None

    def _limit_kept(self) -> None:
        kept = self._kept_lru()
        for each in kept[: max(0, len(kept) - self._max_kept)]:
            self._kept.remove(each)

    # ---- Generators (kept ones; seeded, min_tokens, logprobs) -----------------------------

    def _start_generator(self, job: Job) -> None:
        params = og.GeneratorParams(self._model)
        params.set_search_options(**_search_options(job.options, len(job.prompt), job.capacity or None))
        with self._compiling(job.options):
            if job.options.guidance is not None:
                params.set_guidance(*job.options.guidance)
            job.generator = og.Generator(self._model, params)
        job.admitted_at = time.perf_counter()
        self._generators.append(job)

    def _step_generator(self, job: Job) -> None:
        gen = job.generator
        if job.fed < len(job.prompt):
            rest = len(job.prompt) - job.fed
            chunk = rest if rest <= self._prefill_chunk + 1 else self._prefill_chunk
            gen.append_tokens(job.prompt[job.fed : job.fed + chunk])
            job.fed += chunk
            return
        # Read before the step: after it, the logits are already the next token's.
        logits = gen.get_logits() if job.options.logprobs is not None else None
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in self._eos:  # not counted, as the Engine API does not count it
            self._end_generator(job, "stop")
            return
        job.generated += 1
        job.sampled += 1
        job.pending_text.append(job.stream.decode(token))
        if logits is not None:
            job.pending_logprobs.append(token_logprob(logits, token, job.options.logprobs or 0, self._token_bytes))
        if gen.is_done() or job.sampled >= job.options.max_tokens:  # a kept one's cache is larger than needed
            self._end_generator(job, "length")
        else:
            self._flush(job)

    @contextlib.contextmanager
    def _compiling(self, options: SamplingOptions) -> Iterator[None]:
        """Where a grammar compiles (native code, the client's text): watched, and its refusals made the client's."""
        watch = self._on_compile if options.guidance is not None else None
        if watch is not None:
            watch(options.guidance)
        try:
            with _guidance_errors(options):
                yield
        finally:
            if watch is not None:
                watch(None)

    def _token_bytes(self, token: int) -> bytes:
        """A token's own bytes (a byte-level tokenizer's table); else what the runtime decodes it to."""
        table = self._byte_table
        if table is not None and 0 <= token < len(table):
            return table[token]
        return str(self._tokenizer.decode(np.array([token], dtype=np.int32))).encode()

    def _end_generator(self, job: Job, finish: EngineFinish) -> None:
        """A Generator sequence has ended: one that is kept stays, its cache resident, for a later prompt."""
        self._generators.remove(job)
        generator, job.generator = job.generator, None
        self._finish(job, finish=finish)
        if job.keep:
            sequence = np.asarray(generator.get_sequence(0), dtype=np.int32)
            settings = job.options.generator_settings
            self._kept.append(
                Kept(generator, sequence, job.capacity, settings, job.kv_bytes, time.monotonic(), job.scope)
            )
            self._limit_kept()

    # ---- results ----------------------------------------------------------------------

    def _finish(self, job: Job, *, finish: EngineFinish | None = None, error: str | None = None) -> None:
        job.done = True
        job.pending_text.append(job.stream.flush())
        if error is not None:
            job.keep = False
        self._send(
            job,
            Delta(
                "".join(job.pending_text),
                job.generated,
                finish=finish,
                error=error,
                admitted_at=job.admitted_at,
                cached_tokens=job.cached_tokens,
                logprobs=tuple(job.pending_logprobs),
            ),
        )
        job.pending_text.clear()
        job.pending_logprobs.clear()
        job.generated = 0
        if job.request is not None:
            self._release(job)

    def _flush(self, job: Job) -> None:
        """Hand over the tokens generated so far: the first at once (time to first token), then every
        ``stream_interval`` tokens. Each handover wakes the event loop, which takes a core from the engine."""
        if job.done or not job.generated:
            return
        if job.delivered and job.generated < self._stream_interval:
            return
        job.delivered = True
        delta = Delta(
            "".join(job.pending_text),
            job.generated,
            admitted_at=job.admitted_at,
            cached_tokens=job.cached_tokens,
            logprobs=tuple(job.pending_logprobs),
        )
        self._send(job, delta)
        job.pending_text.clear()
        job.pending_logprobs.clear()
        job.generated = 0

    def _send(self, job: Job, delta: Delta) -> None:
        self._outbox.setdefault(job.loop, []).append((job.queue, delta))

    def deliver(self) -> None:
        """Hand this round's deltas to their event loops (asyncio.Queue is not thread-safe)."""
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                log.debug("dropped %d deltas for a closed event loop", len(items))
        self._outbox = {}

    def _guarded(self, action: Callable[[], None], concerned: list[Job]) -> bool:
        """Run one action; if the engine raises, fail the sequences it concerned and keep serving the rest (False).
        ``cancel`` never raises, so this error path cannot take the owner thread down with it."""
        try:
            action()
        except GuidanceRejected as exc:
            log.info("guidance refused by the engine: %s", exc)
            self._fail(concerned, str(exc), grammar=True)
            return False
        except Exception as exc:  # one failure must not stop the owner thread
            grammar = _grammar_fault(exc)
            if grammar is None:
                log.exception("engine step failed")
                self._fail(concerned, type(exc).__name__, grammar=False)
            else:  # the client's grammar broke the step: its 400, not a fault of ours
                log.info("a grammar failed while tokens were committed: %s", grammar)
                self._fail(concerned, grammar, grammar=True)
            return False
        return True

    def _fail(self, jobs: list[Job], reason: str, *, grammar: bool) -> None:
        """End each of ``jobs`` still running with an error: a refused grammar for those that asked for one when
        the grammar was at fault (the client's error), the engine's error for the rest."""
        for job in jobs:
            if not job.done:
                self.cancel(job)
                if grammar and job.options.guidance is not None:
                    self._send(job, Delta("", 0, error="guidance", rejected=reason))
                else:
                    self._send(job, Delta("", 0, error=reason))


@contextlib.contextmanager
def _guidance_errors(options: SamplingOptions) -> Iterator[None]:
    """The engine builds a sequence's grammar when its turn begins and raises "Error creating grammar: ..." for a
    schema it cannot compile (measured: unknown types, dangling $ref, bad patterns): that is a GuidanceRejected. So
    is running out of memory while it compiles (the engine process's cap, ``engine_worker.py``): the grammar asked
    for more than the engine may hold."""
    try:
        yield
    except MemoryError as exc:
        if options.guidance is None:
            raise
        raise GuidanceRejected(_OUT_OF_MEMORY) from exc
    except RuntimeError as exc:
        if options.guidance is not None and "bad_alloc" in str(exc):
            raise GuidanceRejected(_OUT_OF_MEMORY) from exc
        if options.guidance is not None and "grammar" in str(exc):
            raise GuidanceRejected(str(exc)) from exc
        raise


def _grammar_fault(exc: Exception) -> str | None:
    """The grammar parser's own error inside an engine failure ("Parser Error: Current row has 2100 items; max is
    2000 ..." while tokens are committed: measured with an anyOf of ~2000 branches), or None for any other."""
    text = str(exc)
    start = text.find(_PARSER_ERROR)
    # Its first line only: the parser goes on to dump its state, the tokens generated so far included.
    return None if start < 0 else text[start:].partition("\n")[0][:_GRAMMAR_MESSAGE_CHARS]


def _search_options(options: SamplingOptions, prompt_tokens: int, capacity: int | None = None) -> dict[str, Any]:
    """A Generator's search options (its lengths count the prompt; a kept one's cache holds ``capacity`` tokens)."""
    search: dict[str, Any] = {
        "max_length": capacity or prompt_tokens + options.max_tokens,
        "do_sample": not options.greedy,
        "repetition_penalty": options.repetition_penalty,
    }
    if options.min_tokens:
        search["min_length"] = prompt_tokens + options.min_tokens
    if not options.greedy:
        search.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    if options.seed is not None:
        search["random_seed"] = options.seed
    return search


def _close(request: Any) -> None:
    """Free an engine request; freeing must not fail the caller (the engine logs its own reason)."""
    try:
        request.close()
    except Exception:
        log.warning("closing an engine request failed", exc_info=True)


def _finish_reason(reason: Any) -> EngineFinish:
    if reason == og.FinishReason.CANCELLED:
        return "cancelled"
    if reason in (og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS):
        return "length"
    return "stop"
