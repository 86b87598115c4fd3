"""The embedded engine behind a process wall: the server's side of it.

Why a process: a client's JSON schema or tool list becomes a grammar that native code compiles (``llguidance``
inside the runtime), and native code cannot be defended with ``try``. Measured on 0.18: a long ``$ref`` chain
overflowed the owner thread's stack (SIGSEGV: the whole server gone), an array bound grew the process by
gigabytes, a large alternation compiled for seconds while holding the GIL (the event loop stood still). Bounds
(``schema_bounds.py``) stop the cases measured; the wall is for the ones nobody measured yet. The engine, its owner
thread and its tokenizer run in a process of their own (``engine_worker.py``, the shape of vLLM V1's engine core):

- its GIL is its own, so compiling or a Generator's logits never stall the server's event loop;
- its memory is capped (``ENGINE_MEMORY_LIMIT_MB``): its data segment cannot grow past the cap, the server kills it
  if its resident memory does, and the kernel's OOM killer picks it before the server;
- when it dies, only the requests it was running fail (500 ``engine_error``; a 400 for the request whose grammar
  was compiling at that moment), ``/health/ready`` is 503 while a new one loads, and requests that arrive meanwhile
  wait for it; a grammar that was compiling when it died is refused with a 400 ever after (by fingerprint), so one
  request cannot kill it twice;
- a restart that cannot load the model is the engine's failure: the server stops (exit 3), as before.

The hop costs one pickled frame per round each way (``frames.py``); the figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from genai_server.embedded import frames
from genai_server.embedded.engine import EngineConfig, EngineFacts, default_memory_budget_bytes, read_deltas
from genai_server.embedded.scheduler import Delta, GuidanceRejected, SamplingOptions, guidance_fingerprint
from genai_server.errors import EngineFailure, InvalidRequest, ModelLoadingFailed, ShuttingDown

log = logging.getLogger(__name__)

# How often the server looks at the engine process's resident memory.
WATCH_INTERVAL_S = 0.05
# Memory beyond the weights and the KV budget: the runtime's buffers, the tokenizer, Python, compiled grammars.
_MEMORY_HEADROOM_BYTES = 1 << 30
# Restarts that follow each other quickly wait longer each time (a model that loads and dies at once must not spin).
_RESTART_DELAYS_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # the first death of an engine that had lived: at once
_STABLE_S = 60.0  # an engine that lived this long resets the delays
# After a stop command the engine ends every sequence (after the step it is in) and exits; then it is killed. Short:
# the drain before it has had SHUTDOWN_TIMEOUT, and the service managers' stop timeouts allow for a few seconds.
_STOP_WAIT_S = 3.0
_EXIT_WAIT_S = 1.0  # a process whose event pipe closed has this long to exit before it is killed
_BANNED_GRAMMARS = 1024  # fingerprints remembered, oldest forgotten first
_KILLED_GRAMMAR = "compiling it stopped the engine process, so it is refused"


def memory_limit_bytes(model_path: Path, config: EngineConfig, limit_mb: float | None) -> int:
    """The engine process's cap: as set, else twice the weights (the runtime may repack them), the KV-cache budget,
    and 1 GiB for the rest; at most 90 % of the machine's or container's memory, so that the cap, not the kernel,
    stops it first."""
    if limit_mb is not None:
        return int(limit_mb * 2**20)
    weights = sum(f.stat().st_size for f in model_path.iterdir() if f.is_file()) if model_path.is_dir() else 0
    half = default_memory_budget_bytes()  # half of what this process may use
    budget = int(config.memory_budget_mb * 2**20) if config.memory_budget_mb else half
    return min(2 * weights + budget + _MEMORY_HEADROOM_BYTES, int(2 * half * 0.9))


def resident_bytes(pid: int) -> int:
    """A process's resident memory (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


@dataclass(eq=False)
class _Child:
    """One engine process and what the server waits on from it."""

    proc: asyncio.subprocess.Process
    started_at: float
    commands: asyncio.WriteTransport | None = None
    events: asyncio.ReadTransport | None = None
    first: asyncio.Future[list[frames.Message] | None] | None = None  # the frame that says it loaded, or None
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # its event pipe closed
    live: dict[int, tuple[asyncio.Queue[Delta], str | None]] = field(default_factory=dict)  # key: deltas, grammar
    calls: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    gauges: tuple[int, int, float] = (0, 0, 0.0)
    compiling: str | None = None  # the fingerprint of the grammar being compiled now
    compiling_since: float = 0.0
    over_cap: int = 0  # resident bytes when the server killed it for passing its memory cap
    compile_overran: bool = False  # killed because a grammar compiled past the deadline
    alive: bool = True

    def send(self, *messages: frames.Message) -> None:
        if self.alive and self.commands is not None and not self.commands.is_closing():
            self.commands.write(frames.encode(list(messages)))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def close_pipes(self) -> None:
        for transport in (self.commands, self.events):
            if transport is not None:
                transport.close()


class EngineProcess:
    """The ``EmbeddedEngine`` of ``engine.py``, run in a supervised process of its own."""

    def __init__(
        self,
        model_path: Path,
        config: EngineConfig | None = None,
        *,
        memory_limit_mb: float | None = None,
        compile_timeout_s: float = 10.0,
        log_level: str = "INFO",
        log_format: str = "text",
    ) -> None:
        """``compile_timeout_s``: how long one grammar may compile before the process is stopped and the grammar
        refused."""
        self.model_path = model_path
        self.config = config or EngineConfig()
        self.compile_timeout_s = compile_timeout_s
        self.memory_limit = memory_limit_bytes(model_path, self.config, memory_limit_mb)
        self._log = (log_level, log_format)
        self.facts = EngineFacts()
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._child: _Child | None = None
        self._available = asyncio.Event()  # set while a child serves, or once none ever will (failed, closed)
        self._closing = False
        self._keys = itertools.count()
        self._banned: OrderedDict[str, str] = OrderedDict()  # grammar fingerprint: why it is refused
        self._tasks: set[asyncio.Task[None]] = set()
        self._quick_deaths = 0

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine process and load the model in it; ``ModelLoadingFailed`` with the reason."""
        await self._spawn()

    async def close(self) -> None:
        """End what runs (each sequence ends as cancelled), stop the process, and wait for it."""
        self._closing = True
        self._available.set()  # whoever waits for a restart learns the server is shutting down
        child = self._child
        if child is not None and child.proc.returncode is None:
            child.send(("stop",))
            try:
                await asyncio.wait_for(child.proc.wait(), _STOP_WAIT_S)
            except TimeoutError:
                log.warning("the engine process did not stop in %.0f s: killed", _STOP_WAIT_S)
                child.kill()
                await child.proc.wait()
        for task in list(self._tasks):
            task.cancel()  # a restart (a spawn cut short kills its process), the watch, the supervision
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if child is not None:
            child.alive = False
            child.close_pipes()
            self._end(child, Delta("", 0, finish="cancelled"), ShuttingDown("The server is shutting down"))

    def ready(self) -> bool:
        """An engine process is serving (False while one restarts, and for good once the engine failed)."""
        return self.failure is None and self._child is not None and self._child.alive and not self._closing

    def active_sequences(self) -> int:
        """Sequences waiting or generating in the engine process (as it last said)."""
        return self._child.gauges[0] if self._child is not None else 0

    def waiting_sequences(self) -> int:
        """Sequences waiting there for a batch to start."""
        return self._child.gauges[1] if self._child is not None else 0

    def kv_cache_usage(self) -> float:
        """The share of the KV-cache budget running sequences hold there."""
        return self._child.gauges[2] if self._child is not None else 0.0

    # ---- work --------------------------------------------------------------------------

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, from the engine process's tokenizer."""
        result: list[list[int]] = await self._call("tokenize", texts)
        return result

    async def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The conversation rendered with the model's template and tokenised, in the engine process."""
        result: list[int] = await self._call("chat_prompt", messages, tools)
        return result

    async def detokenize(self, id_lists: list[list[int]]) -> list[str]:
        """Each list of token ids as text, from the engine process's tokenizer."""
        result: list[str] = await self._call("detokenize", id_lists)
        return result

    async def generate(
        self, prompt: list[int], options: SamplingOptions, cache_scope: str = ""
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one sequence; closing the iterator early cancels it in the engine process."""
        grammar = None if options.guidance is None else guidance_fingerprint(options.guidance)
        if grammar is not None and grammar in self._banned:
            raise GuidanceRejected(self._banned[grammar])
        child = await self._serving()
        key = next(self._keys)
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        child.live[key] = (deltas, grammar)
        child.send(("generate", key, prompt, options, cache_scope))
        read = read_deltas(
            deltas, done=partial(_forget, child.live, key), abandoned=partial(child.send, ("cancel", key))
        )
        async with contextlib.aclosing(read) as stream:
            async for delta in stream:
                yield delta

    async def _call(self, kind: str, *args: Any) -> Any:
        child = await self._serving()
        key = next(self._keys)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        child.calls[key] = answer
        child.send((kind, key, *args))
        try:
            return await answer
        finally:
            child.calls.pop(key, None)

    async def _serving(self) -> _Child:
        """The engine process now serving; while a new one loads, wait for it."""
        while True:
            if self.failure is not None:
                raise EngineFailure("the engine has failed; the server is restarting")
            if self._closing:
                raise ShuttingDown("The server is shutting down; no new generation starts")
            child = self._child
            if child is not None and child.alive:
                return child
            self._available.clear()  # no engine serves: set again by the next one, a failure, or close()
            await self._available.wait()

    # ---- the process -------------------------------------------------------------------

    async def _spawn(self) -> None:
        """Start an engine process and wait until its model has loaded. Whatever goes wrong on the way (or a
        ``close()`` that cancels it), the process is killed and every pipe closed before the error goes on."""
        loop = asyncio.get_running_loop()
        command_read, command_write = os.pipe()
        event_read, event_write = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "genai_server.embedded.engine_worker",
                str(command_read),
                str(event_write),
                pass_fds=(command_read, event_write),
                stdin=asyncio.subprocess.DEVNULL,
                env=_worker_env(),
            )
        except BaseException:
            os.close(command_write)
            os.close(event_read)
            raise
        finally:
            os.close(command_read)
            os.close(event_write)
        child = _Child(proc, started_at=loop.time(), first=loop.create_future())
        try:
            await self._connect(child, event_read, command_write)
            level, fmt = self._log
            child.send(("start", str(self.model_path), self.config, level, fmt, self.memory_limit))
            self._track(self._watch(child))  # the cap holds while the model loads too
            assert child.first is not None
            self.facts = await self._loaded(child, await child.first)
        except BaseException:
            child.alive = False
            child.kill()
            child.close_pipes()
            await proc.wait()
            raise
        child.started_at = loop.time()  # how long it lived counts from here (a slow load is not a long life)
        self._child = child
        self._available.set()
        self._track(self._supervise(child))
        log.info(
            "engine process started",
            extra={"fields": {"pid": proc.pid, "memory_limit_mb": round(self.memory_limit / 2**20)}},
        )

    async def _connect(self, child: _Child, event_read: int, command_write: int) -> None:
        """The server's ends of the two pipes, on the event loop."""
        loop = asyncio.get_running_loop()
        events, commands = os.fdopen(event_read, "rb", 0), os.fdopen(command_write, "wb", 0)
        try:
            reader = frames.FrameReader(
                lambda messages: self._on_frame(child, messages), child.ended.set, on_error=lambda: child.kill()
            )
            child.events, _ = await loop.connect_read_pipe(lambda: reader, events)
            child.commands, _ = await loop.connect_write_pipe(asyncio.Protocol, commands)
        except BaseException:
            events.close()
            commands.close()
            raise

    async def _loaded(self, child: _Child, messages: list[frames.Message] | None) -> EngineFacts:
        """The facts of the model the new process loaded (its first frame), or ``ModelLoadingFailed`` with why it
        did not."""
        if messages and messages[0][0] == "ready":
            facts: EngineFacts = messages[0][1]
            return facts
        status = await child.proc.wait()  # it ends by itself: its pipes are closed by _spawn's cleanup
        if messages and messages[0][0] == "load_failed":
            raise ModelLoadingFailed(str(messages[0][1]))
        raise ModelLoadingFailed(f"cannot load model from {self.model_path}: the engine process {_exit_reason(status)}")

    def _track(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_frame(self, child: _Child, messages: list[frames.Message]) -> None:
        """A frame from the engine process: the first says whether it loaded, the rest are events."""
        if child.first is not None and not child.first.done():
            child.first.set_result(messages)
            return
        for message in messages:
            try:
                self._on_event(child, message)
            except Exception:  # one bad message must not cost the others in the frame their answers
                log.exception("an event from the engine process could not be handled: %r", message[:2])

    async def _supervise(self, child: _Child) -> None:
        """Wait for the engine process to end (its event pipe closes, or it exits), then deal with its end: a stop
        asked for, or a death."""
        ended = asyncio.ensure_future(child.ended.wait())
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait({ended, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        child.alive = False  # and at once, before any await: no request may be handed to it from now on
        if not self._closing:
            self._available.clear()
        child.close_pipes()
        try:
            status = await asyncio.wait_for(exited, _EXIT_WAIT_S)
        except TimeoutError:  # its pipe closed but it runs on: it can no longer be spoken to
            child.kill()
            status = await child.proc.wait()
        if self._closing and status == 0:
            return  # close() ends what is left
        self._on_death(child, status)
        if not self._closing:
            self._track(self._restart(child))

    def _end(self, child: _Child, last: Delta, error: BaseException) -> None:
        """Answer every sequence and call of ``child`` still waiting: ``last`` for each sequence, ``error`` for each
        call."""
        for deltas, _ in child.live.values():
            deltas.put_nowait(last)
        for answer in child.calls.values():
            if not answer.done():
                answer.set_exception(error)
        child.live.clear()
        child.calls.clear()
        child.gauges = (0, 0, 0.0)

    def _on_event(self, child: _Child, message: frames.Message) -> None:
        kind = message[0]
        if kind == "delta":
            live = child.live.get(message[1])
            if live is not None:
                live[0].put_nowait(Delta(*message[2]))
        elif kind == "gauges":
            child.gauges = message[1:]
        elif kind == "compiling":
            child.compiling, child.compiling_since = message[1], asyncio.get_running_loop().time()
        elif kind in ("result", "raised"):
            answer = child.calls.pop(message[1], None)
            if answer is not None and not answer.done():
                if kind == "result":
                    answer.set_result(message[2])
                else:
                    answer.set_exception(_raised(*message[2:]))
        elif kind == "failed":
            log.critical("the engine process's owner thread failed: %s", message[1])

    def _on_death(self, child: _Child, status: int) -> None:
        """Fail what the dead process ran: the request whose grammar was compiling gets the client's 400 (and its
        grammar is refused from now on), the rest the engine's error."""
        culprit = child.compiling
        refusal = _KILLED_GRAMMAR
        if child.compile_overran:
            refusal = f"it did not compile within {self.compile_timeout_s:g} s, so it is refused"
        if culprit is not None:
            self._banned[culprit] = refusal
            while len(self._banned) > _BANNED_GRAMMARS:
                self._banned.popitem(last=False)
        log.error(
            "the engine process %s; its requests failed and a new one is starting",
            _exit_reason(status),
            extra={
                "fields": {
                    "pid": child.proc.pid,
                    "exit_status": status,
                    "requests_failed": len(child.live),
                    "over_memory_cap_mb": round(child.over_cap / 2**20) if child.over_cap else None,
                    "compile_overran": child.compile_overran or None,
                    "compiling_grammar": culprit[:16] if culprit else None,
                }
            },
        )
        for key, (deltas, grammar) in list(child.live.items()):
            if grammar is not None and grammar == culprit:
                deltas.put_nowait(Delta("", 0, error="guidance", rejected=refusal))
                del child.live[key]
        failure = f"the engine process {_exit_reason(status)}"
        self._end(child, Delta("", 0, error=failure), EngineFailure(failure))

    async def _restart(self, dead: _Child) -> None:
        """A new engine process after a short wait (longer after each quick death); one that cannot start is the
        engine's failure, and the server stops."""
        loop = asyncio.get_running_loop()
        lived = loop.time() - dead.started_at
        self._quick_deaths = 1 if lived >= _STABLE_S else self._quick_deaths + 1
        try:
            await asyncio.sleep(_RESTART_DELAYS_S[min(self._quick_deaths, len(_RESTART_DELAYS_S)) - 1])
            await self._spawn()
        except asyncio.CancelledError:
            raise  # close() stops it
        except Exception as exc:  # noqa: BLE001 - a model that no longer loads, or no process starts (fork, fds)
            log.critical("the engine process could not be restarted: %s", exc)
            self.failure = exc
            self._available.set()
            if self.on_failure is not None:
                self.on_failure(exc)
            return

    async def _watch(self, child: _Child) -> None:
        """Every ``WATCH_INTERVAL_S``: kill the process when its resident memory passes the cap (its data limit
        holds between two looks), or when one grammar has compiled for longer than the deadline."""
        loop = asyncio.get_running_loop()
        while child.proc.returncode is None:
            rss = resident_bytes(child.proc.pid)
            if rss > self.memory_limit:
                child.over_cap = rss
                log.error(
                    "the engine process holds %.0f MB, over its cap of %.0f MB: killed",
                    rss / 2**20,
                    self.memory_limit / 2**20,
                )
                child.kill()
                return
            if child.compiling is not None and loop.time() - child.compiling_since > self.compile_timeout_s:
                child.compile_overran = True
                log.error("a grammar has compiled for over %g s: the engine process is killed", self.compile_timeout_s)
                child.kill()
                return
            await asyncio.sleep(WATCH_INTERVAL_S)


def _worker_env() -> dict[str, str]:
    """This environment, with this package's own folder first on the path: the engine process imports the same
    code as the server, wherever the server was started from."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root}


def _forget(live: dict[int, Any], key: int) -> None:
    live.pop(key, None)


def _raised(kind: str, text: str, param: str | None = None) -> BaseException:
    """The error a call the engine process could not answer raises here: shutting down and a client's error stay
    themselves; anything else is the engine's failure, its text for the log only (a template's own error may quote
    the prompt)."""
    if kind == "ShuttingDown":
        return ShuttingDown("The server is shutting down; no new generation starts")
    if kind == "InvalidRequest":
        return InvalidRequest(text, param=param)
    log.warning("the engine process could not tokenise a prompt: %s: %s", kind, text)
    return EngineFailure("the engine failed to tokenise the prompt")


def _exit_reason(status: int) -> str:
    """How a process ended, in words: "was killed by SIGSEGV", "exited with status 3"."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
