"""The engine process's main: ``python -m genai_server.embedded.engine_worker CMD_FD EVENT_FD``.

The server (``engine_process.py``) starts it and speaks to it in frames (``frames.py``): commands come in on one pipe,
events go out on the other. Here the engine runs exactly as in the server's own process (``OnnxEngine``: the owner
thread, the scheduler), except that each round's deltas are written to the pipe by the owner thread itself, in one
frame, instead of being handed to an event loop. Tokenising runs on a small pool so that a long text does not hold
up commands. The process ends when the server says stop or its pipe closes (the server has gone), and with exit
status 3 if the owner thread dies.

Commands: ``("start", model_path, EngineConfig, log_level, log_format, memory_limit_bytes)`` first, then
``("generate", key, prompt, options, scope)``, ``("cancel", key)``, ``("tokenize", key, texts)``,
``("chat_prompt", key, messages, tools)``, ``("detokenize", key, id_lists)``, ``("stop",)``.
Events: ``("ready", facts)`` or ``("load_failed", reason)``, ``("delta", key, delta)``, ``("result", key, value)``,
``("raised", key, error class, text, param)``, ``("compiling", fingerprint or None)``,
``("gauges", active, waiting, kv_usage)``, ``("failed", reason)`` (the owner thread died; the process exits 3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from genai_server.embedded import frames
from genai_server.embedded.engine import TOKENIZER_THREADS, OnnxEngine
from genai_server.embedded.scheduler import Delta, Job, guidance_fingerprint
from genai_server.errors import InvalidRequest, ModelLoadingFailed, ShuttingDown
from genai_server.exit_status import ExitStatus
from genai_server.logs import setup_logging

log = logging.getLogger(__name__)

# How often the gauges are sent when they change, and at least this often as a heartbeat.
GAUGE_INTERVAL_S = 0.05
HEARTBEAT_S = 1.0
# The kernel's OOM killer picks the process with the highest score: the engine, not the server that would answer
# its clients and restart it.
_OOM_SCORE_ADJ = "500"


class _Sink:
    """A sequence's deltas, gathered for the round's frame."""

    def __init__(self, key: int, outbox: _Outbox) -> None:
        self.key = key
        self._outbox = outbox

    def put_nowait(self, item: Delta, /) -> None:
        # Its fields, not the dataclass: a tuple pickles in a quarter of the time, and this is once per token.
        # ``admitted_at`` is perf_counter(), CLOCK_MONOTONIC on Linux: the same clock in the server's process.
        fields = (item.text, item.tokens, item.finish, item.error, item.admitted_at, item.cached_tokens)
        self._outbox.pending.append(("delta", self.key, (*fields, item.rejected, item.logprobs)))
        if item.finish is not None or item.error is not None:
            self._outbox.finished.append(self.key)


class _Outbox:
    """The scheduler's delivery loop in this process: ``call_soon_threadsafe`` runs the hand-over at once, on the
    owner thread, and writes the round's deltas as one frame."""

    def __init__(self, writer: frames.BlockingWriter) -> None:
        self.writer = writer
        self.pending: list[frames.Message] = []
        self.finished: list[int] = []  # keys whose sequence ended this round
        self.on_finished: Callable[[int], None] = lambda key: None
        # The gauges as this round left them, sent with its deltas: the server never shows a finished sequence
        # as still running.
        self.gauges: Callable[[], frames.Message] | None = None

    def call_soon_threadsafe(self, callback: Callable[..., object], /, *args: Any) -> None:
        callback(*args)
        if self.pending:
            messages, self.pending = self.pending, []
            gauges = self.gauges
            if gauges is not None:
                self.writer.send_current(lambda: [*messages, gauges()])
            else:
                self.writer.send(*messages)
        for key in self.finished:
            self.on_finished(key)
        self.finished.clear()


class Worker:
    """Commands from the server to the engine, and what the engine answers back."""

    def __init__(self, engine: OnnxEngine, outbox: _Outbox) -> None:
        self.engine = engine
        self.outbox = outbox
        self.writer = outbox.writer
        self.jobs: dict[int, Job] = {}
        self._jobs_lock = threading.Lock()  # the reader adds, the owner thread removes
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        outbox.on_finished = self._forget
        outbox.gauges = self._gauge_message

    def serve(self, commands: BinaryIO) -> None:
        """Run commands until told to stop or the server goes."""
        threading.Thread(target=self._gauges, name="gauges", daemon=True).start()
        while (messages := frames.read_blocking(commands)) is not None:
            for message in messages:
                if message[0] == "stop":
                    return
                try:
                    self._command(message)
                except Exception:  # one bad command must not end the process, and every request with it
                    log.exception("a command from the server failed: %r", message[:2])
                    self._refuse(message)

    def close(self) -> None:
        """Cancel what runs (each sequence is told, and the server with it) and stop the owner thread."""
        self.engine.shutdown()
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    def _command(self, message: frames.Message) -> None:
        kind, key, *args = message
        if kind == "generate":
            prompt, options, scope = args
            job = Job(np.asarray(prompt, dtype=np.int32), options, self.outbox, _Sink(key, self.outbox), scope)
            with self._jobs_lock:
                self.jobs[key] = job
            self.engine.submit(job)
        elif kind == "cancel":
            with self._jobs_lock:
                cancelled = self.jobs.pop(key, None)
            if cancelled is not None:
                self.engine.cancel(cancelled)
        elif kind == "tokenize":
            self._tokenizers.submit(self._answer, key, lambda: [self.engine.encode(t) for t in args[0]])
        elif kind == "chat_prompt":
            messages, tools = args
            self._tokenizers.submit(self._answer, key, lambda: self.engine.encode_chat(messages, tools))
        elif kind == "detokenize":
            self._tokenizers.submit(self._answer, key, lambda: [self.engine.decode(ids) for ids in args[0]])
        else:
            log.error("unknown command from the server: %r", kind)

    def _refuse(self, message: frames.Message) -> None:
        """Answer a command that failed, so that nobody waits for it."""
        kind, key = message[0], message[1]
        if kind == "generate":
            failed = ("", 0, None, "the engine could not take the sequence", None, 0, None, ())
            self.writer.send(("delta", key, failed))
        elif kind in ("tokenize", "chat_prompt", "detokenize"):
            self.writer.send(("raised", key, "RuntimeError", "the command failed", None))

    def _answer(self, key: int, work: Callable[[], Any]) -> None:
        try:
            value = work()
        except Exception as exc:  # the server raises it for the request that asked
            if not isinstance(exc, ShuttingDown | InvalidRequest):
                log.exception("tokenising failed")
            self.writer.send(("raised", key, type(exc).__name__, str(exc), getattr(exc, "param", None)))
            return
        self.writer.send(("result", key, value))

    def _forget(self, key: int) -> None:
        with self._jobs_lock:
            self.jobs.pop(key, None)

    def _gauge_message(self) -> frames.Message:
        return ("gauges", self.engine.active_sequences(), self.engine.waiting_sequences(), self.engine.kv_cache_usage())

    def _gauges(self) -> None:
        """Send the gauges when they change between rounds (a cancel, an admission), and as a heartbeat at least
        every ``HEARTBEAT_S``."""
        last: frames.Message | None = None
        quiet = 0.0
        while True:
            now = self._gauge_message()
            if now != last or quiet >= HEARTBEAT_S:
                self.writer.send_current(lambda: [self._gauge_message()])
                last, quiet = now, 0.0
            time.sleep(GAUGE_INTERVAL_S)
            quiet += GAUGE_INTERVAL_S


def _limit_memory(limit_bytes: int) -> None:
    """The process's own cap: its data segment (every heap and anonymous mapping) may not grow past it, and the
    kernel's OOM killer takes it before the server. The server also kills it when its resident memory passes the
    cap (``engine_process.py``): this is the bound that holds between two of those looks."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:  # a lower limit set from outside (ulimit, systemd) stays
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, hard))
    with contextlib.suppress(OSError):  # raising one's own score needs no privilege; a sandbox may still refuse
        Path("/proc/self/oom_score_adj").write_text(_OOM_SCORE_ADJ)


def main(argv: list[str]) -> int:
    """Load the model the server names, then serve its commands."""
    # The server decides when this process ends (a stop command, or its pipe closing): a Ctrl-C in a terminal or a
    # SIGTERM sent to the whole group must not end the engine while the server drains its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    command_fd, event_fd = int(argv[1]), int(argv[2])
    for fd in (command_fd, event_fd):  # a process this one starts must not hold the server's pipes open
        os.set_inheritable(fd, False)
    commands = os.fdopen(command_fd, "rb")
    writer = frames.BlockingWriter(event_fd)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the event pipe
    start = frames.read_blocking(commands)
    if not start or start[0][0] != "start":
        return int(ExitStatus.BAD_SETTING)
    _, model_path, config, log_level, log_format, memory_limit = start[0]
    setup_logging(log_level, log_format)
    _limit_memory(memory_limit)
    outbox = _Outbox(writer)

    def compiling(guidance: tuple[str, str] | None) -> None:
        # Written (a blocking write) before the native compiler runs: if it kills the process, the server knows why.
        writer.send(("compiling", None if guidance is None else guidance_fingerprint(guidance)))

    engine = OnnxEngine(Path(model_path), config, on_compile=compiling)
    engine.on_failure = lambda exc: _die(writer, exc)
    try:
        engine.load(outbox)
    except ModelLoadingFailed as exc:
        writer.send(("load_failed", str(exc)))
        return int(ExitStatus.MODEL_LOADING_FAILED)
    writer.send(("ready", engine.facts))
    worker = Worker(engine, outbox)
    try:
        worker.serve(commands)
    finally:
        worker.close()
    return int(ExitStatus.STOPPED)


def _die(writer: frames.BlockingWriter, exc: BaseException) -> None:
    """The owner thread died (a bug of ours): the server fails what ran here and starts a new engine."""
    with contextlib.suppress(OSError):
        writer.send(("failed", f"{type(exc).__name__}: {exc}"))
    os._exit(ExitStatus.ENGINE_FAILED)  # no logging.shutdown(): another thread may hold a handler's lock


if __name__ == "__main__":
    sys.exit(main(sys.argv))
