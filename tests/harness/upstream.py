"""The engines a gateway relays to, scripted: what they send when all goes well, and every way they break.

``ScriptedUpstream`` is the one scripted OpenAI-style engine: each model name a client asks for is a script (an
answer, a stream that never ends, a stall). It records what it was sent and counts the requests it saw leave. It is
served in the test's process (``app()`` for pytest-aiohttp's ``aiohttp_server``) when the server under test is in
the process too, or from a thread of its own (``with upstream:``) when the server under test is another process.
``AppInThread`` is that thread, for any app of the test's own (an OTLP collector, say).

The pieces scripts are made of are here too: ``sse`` and ``chunk`` (OpenAI's stream), ``USAGE`` (its usage chunk),
``ndjson`` and ``OLLAMA_CHAT`` (Ollama's native stream), and ``ENGINE_SCRIPTS`` (the shapes real engines send, and
their faults).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

# ---- OpenAI's stream ------------------------------------------------------------------------------------------


def sse(*events: Any, done: bool = True) -> bytes:
    """Server-sent events, one per JSON value (or raw bytes), ending with ``[DONE]`` unless ``done`` is false."""
    body = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    """One chat completion chunk with ``text`` as its delta."""
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


# The usage chunk OpenAI sends last when asked for it: no choices.
USAGE = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "up",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}

# ---- Ollama's stream ------------------------------------------------------------------------------------------


def ndjson(*items: dict[str, Any]) -> bytes:
    """Newline-delimited JSON, Ollama's stream."""
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# The timings Ollama reports on its last line, in nanoseconds.
OLLAMA_DURATIONS = {
    "total_duration": 5_000_000,
    "load_duration": 1_000,
    "prompt_eval_count": 7,
    "prompt_eval_duration": 2_000_000,
    "eval_count": 3,
    "eval_duration": 3_000_000,
}
# Ollama's /api/chat answer: "Hi there!" in three lines, cut by its length limit.
OLLAMA_CHAT = ndjson(
    {"model": "q", "message": {"role": "assistant", "content": "Hi"}, "done": False},
    {"model": "q", "message": {"role": "assistant", "content": " there"}, "done": False},
    {
        "model": "q",
        "message": {"role": "assistant", "content": "!"},
        "done": True,
        "done_reason": "length",
        **OLLAMA_DURATIONS,
    },
)

# ---- scripts --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A whole answer at once: a status, a body, headers."""

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endless:
    """A 200 stream that never ends: ``piece`` again and again, every ``interval`` seconds, until the client leaves
    (which the upstream counts)."""

    piece: bytes
    interval: float = 0.01


@dataclass(frozen=True)
class Stall:
    """No answer for ``seconds`` (an engine that hangs): what a read timeout is for. Part of the script, not a wait
    of the test's."""

    seconds: float = 30.0


@dataclass(frozen=True)
class Drop:
    """A 200 and its headers, then the connection is gone (a replica killed mid-request)."""

    content_type: str = "text/event-stream"


Script = Reply | Endless | Stall | Drop


def _delta(**delta: Any) -> dict[str, Any]:
    """A chat chunk whose delta is ``delta`` (reasoning, tool calls) and no finish."""
    return {**chunk(""), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _call(*, id: str | None = None, name: str | None = None, arguments: str) -> dict[str, Any]:
    """A streamed tool call's piece: the first with its id and name."""
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {"index": 0, **({"id": id, "type": "function"} if id else {}), "function": function}


def _vllm(text: str, finish: str | None = None) -> dict[str, Any]:
    piece = chunk(text, finish)
    piece["choices"][0].update(logprobs=None, stop_reason=None)  # vLLM's extra field
    return {**piece, "system_fingerprint": None}


def _sglang(text: str, finish: str | None = None) -> dict[str, Any]:
    piece = chunk(text, finish)
    piece["choices"][0]["matched_stop"] = 2 if finish else None  # SGLang's extra field
    return piece


def _json(payload: Any, status: int) -> Reply:
    return Reply(json.dumps(payload).encode(), status=status, content_type="application/json")


# The shapes other engines send for "Hello" (and their per-request figures), and the faults they have.
ENGINE_SCRIPTS: dict[str, Script] = {
    "llamacpp": Reply(sse(chunk("Hel"), chunk("lo", "stop"), {**USAGE, "timings": {"predicted_n": 2}})),
    # vLLM sends the role first in an empty-content delta, and its per-request metrics when enabled.
    "vllm": Reply(
        sse(
            {
                **_vllm(""),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            },
            _vllm("Hel"),
            _vllm("lo", "stop"),
            {**USAGE, "metrics": {"time_to_first_token_ms": 3.0}},
        )
    ),
    "sglang": Reply(sse(_sglang("Hel"), _sglang("lo", "stop"), USAGE)),
    # llama-server (b5000+): usage and timings on the last chunk, the one with choices and the finish reason.
    "llamacpp-usage-on-last": Reply(
        sse(chunk("Hel"), {**chunk("lo", "stop"), "usage": USAGE["usage"], "timings": {"predicted_n": 2}})
    ),
    # A reasoning engine (vLLM's reasoning parser): its thinking under ``reasoning_content``, then the answer.
    "reasoning": Reply(
        sse(
            _delta(reasoning_content="Think"),
            _delta(reasoning_content="ing."),
            chunk("Hel"),
            chunk("lo", "stop"),
            USAGE,
        )
    ),
    # vLLM and Ollama's /v1 now name it ``reasoning``.
    "reasoning-named": Reply(sse(_delta(reasoning="Thinking."), chunk("Hello", "stop"), USAGE)),
    # A call of get_weather, its arguments in two pieces, the call's id and name in the first.
    "tool-call": Reply(
        sse(
            _delta(tool_calls=[_call(id="call_up1", name="get_weather", arguments="")]),
            _delta(tool_calls=[_call(arguments='{"city": ')]),
            _delta(tool_calls=[_call(arguments='"Paris"}')]),
            {**_delta(), "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            USAGE,
        )
    ),
    "malformed": Reply(sse(chunk("Hel"), b"{not json")),
    "truncated": Reply(sse(chunk("Hel"), done=False)),
    "error-event": Reply(sse(chunk("Hel"), {"error": {"message": "engine exploded"}})),
    "not-found": _json(
        {
            "error": {
                "message": "model 'x' not here",
                "type": "NotFoundError",
                "code": "model_not_found",
                "param": "model",
            }
        },
        404,
    ),
    "bad-request": _json({"error": {"message": "max_tokens too large", "code": 400}}, 400),
    "crash": Reply(b"Internal Server Error", status=500, content_type="application/json"),
    "slow": Stall(30.0),
    "endless": Endless(sse(chunk("x"), done=False), interval=0.01),
}

# ---- serving --------------------------------------------------------------------------------------------------


class AppInThread:
    """An aiohttp app of the test's own, served on a free port by a thread with its own loop, for a server process
    under test to talk to; a subclass adds its routes in ``routes``. A context manager: up on enter (``port`` and
    ``url`` set), down on exit. ``app()`` builds the same app for serving in the test's own loop instead."""

    port: int

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def app(self) -> web.Application:
        app = web.Application()
        self.routes(app)
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10), "the app's thread did not start serving"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app(), handler_cancellation=True)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)  # the OS picks the port: no race for a free one
        self._loop.run_until_complete(site.start())
        self.port = int(runner.addresses[0][1])
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())


class StaleKeepAlive(AppInThread):
    """An upstream that answers the first request of each connection (``reply``) and keeps the connection open,
    then closes it, without an answer, when a second request comes on it: an upstream that closed an idle
    keep-alive connection just as the gateway reused it. ``requests`` counts the requests that reached it."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.requests = 0
        self._per_connection: dict[int, int] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        connection = id(request.transport)
        self._per_connection[connection] = self._per_connection.get(connection, 0) + 1
        if self._per_connection[connection] > 1 and request.transport is not None:
            request.transport.close()
        return web.Response(body=self.reply, content_type="text/event-stream")


# What vLLM answers on its routes besides chat (the same for any request).
VLLM_ROUTES: dict[str, dict[str, Any]] = {
    "/tokenize": {"count": 3, "max_model_len": 4096, "tokens": [11, 12, 13], "token_strs": ["He", "l", "lo"]},
    "/detokenize": {"prompt": "Hello"},
    "/v1/embeddings": {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    },
}


# An engine's own Responses answer ("Hello") and its stream, as vLLM writes them.
NATIVE_RESPONSE: dict[str, Any] = {
    "id": "resp_up1",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "up",
    "output": [
        {
            "id": "msg_up1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 1},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    },
}
NATIVE_RESPONSE_EVENTS: list[dict[str, Any]] = [
    {
        "type": "response.created",
        "sequence_number": 0,
        "response": {**NATIVE_RESPONSE, "status": "in_progress", "output": []},
    },
    *(
        {
            "type": "response.output_text.delta",
            "sequence_number": i,
            "item_id": "msg_up1",
            "output_index": 0,
            "content_index": 0,
            "delta": piece,
        }
        for i, piece in ((1, "Hel"), (2, "lo"))
    ),
    {"type": "response.completed", "sequence_number": 3, "response": NATIVE_RESPONSE},
]
# An engine's own Messages answer and its stream.
NATIVE_MESSAGE: dict[str, Any] = {
    "id": "msg_up1",
    "type": "message",
    "role": "assistant",
    "model": "up",
    "content": [{"type": "text", "text": "Hello"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 4, "cache_read_input_tokens": 1, "output_tokens": 2},
}
NATIVE_MESSAGE_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            **NATIVE_MESSAGE,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 4, "cache_read_input_tokens": 1, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    *(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        for piece in ("Hel", "lo")
    ),
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 2},
    },
    {"type": "message_stop"},
]


class ScriptedUpstream(AppInThread):
    """An OpenAI-style engine: ``POST /v1/chat/completions`` answers the model it is asked for with that model's
    script (``default`` for any other), and ``GET /v1/models`` answers ``listing`` when one is given (none by
    default, so a probe there gets a 404).

    ``bodies`` and ``headers`` are what each request came with; ``started`` counts the endless streams begun and
    ``disconnects`` those whose client left, which a test polls to see a relay start and end; ``probes`` counts the
    ``GET /v1/models`` asked."""

    def __init__(
        self,
        scripts: Mapping[str, Script] = ENGINE_SCRIPTS,
        *,
        default: Script | None = None,
        listing: Any = None,
    ) -> None:
        self.scripts = scripts
        self.default = default
        self.listing = listing
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.kept: list[tuple[str, str]] = []  # the GETs and DELETEs of a kept response it was sent
        self.started = 0
        self.disconnects = 0
        self.probes = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        # vLLM's other routes, answered alike for every model: /tokenize and /detokenize beside /v1.
        for path, answer in VLLM_ROUTES.items():
            app.router.add_post(path, self._answerer(answer))
        # The Responses and Messages APIs as an engine serves them itself (vLLM, llama-server): the same answer,
        # "Hello", for every model; streamed when asked.
        app.router.add_post("/v1/responses", self._native(NATIVE_RESPONSE, NATIVE_RESPONSE_EVENTS))
        app.router.add_post("/v1/messages", self._native(NATIVE_MESSAGE, NATIVE_MESSAGE_EVENTS))
        app.router.add_post("/v1/messages/count_tokens", self._answerer({"input_tokens": 5}))
        app.router.add_get("/v1/responses/{id}", self._kept)
        app.router.add_delete("/v1/responses/{id}", self._kept)
        if self.listing is not None:
            app.router.add_get("/v1/models", self._models)

    def _native(self, whole: dict[str, Any], events: list[dict[str, Any]]) -> Any:
        async def handle(request: web.Request) -> web.Response:
            body = await request.json()
            self.bodies.append(body)
            if not body.get("stream"):
                return web.json_response({**whole, "model": body["model"]})
            stream = b"".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events)
            return web.Response(body=stream, content_type="text/event-stream")

        return handle

    async def _kept(self, request: web.Request) -> web.Response:
        self.kept.append((request.method, request.path))
        if request.match_info["id"] != NATIVE_RESPONSE["id"]:
            return web.json_response({"error": {"message": "No response found", "code": "not_found"}}, status=404)
        if request.method == "DELETE":
            return web.json_response({"id": NATIVE_RESPONSE["id"], "object": "response", "deleted": True})
        return web.json_response(NATIVE_RESPONSE)

    def _answerer(self, answer: dict[str, Any]) -> Any:
        async def handle(request: web.Request) -> web.Response:
            body = await request.json()
            self.bodies.append(body)
            return web.json_response({**answer, **({"model": body["model"]} if "data" in answer else {})})

        return handle

    async def _models(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response(self.listing)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        script = self.scripts.get(body["model"], self.default)
        assert script is not None, f"no script for model {body['model']!r}"
        if isinstance(script, Stall):
            await asyncio.sleep(script.seconds)
            return web.Response(status=504)
        if isinstance(script, Endless):
            return await self._endless(request, script)
        if isinstance(script, Drop):
            return await dropped(request, script.content_type)
        headers = {"Content-Type": script.content_type, **script.headers}
        return web.Response(status=script.status, body=script.body, headers=headers)

    async def _endless(self, request: web.Request, script: Endless) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.started += 1
        try:
            while True:
                await response.write(script.piece)
                await asyncio.sleep(script.interval)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise


async def dropped(request: web.Request, content_type: str = "text/event-stream") -> web.StreamResponse:
    """Answer 200 with headers, then close the connection (what ``Drop`` scripts, for a replica of any dialect)."""
    response = web.StreamResponse()
    response.content_type = content_type
    await response.prepare(request)
    assert request.transport is not None
    request.transport.close()
    return response
