"""The ``openai`` backend: relays requests to any OpenAI-compatible upstream (vLLM, SGLang, TGI's Messages API,
llama.cpp server, Ollama's /v1) over one shared aiohttp ``ClientSession``.

The upstream is always asked to stream, with usage, so this server times every request itself (TTFT, ITL) even
when the client asked for one JSON answer; chunks are relayed as they arrive. The upstream's own timing fields
(vLLM ``metrics``, llama.cpp ``timings``) are kept under ``backend_reported``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, NamedTuple

import aiohttp
from pydantic import BaseModel

from genai_server.backends import Response, Result
from genai_server.backends.affinity import kept_response
from genai_server.backends.assemble import Assembler, assembly_budget
from genai_server.backends.relay import MAX_JSON_BYTES, RelayBackend
from genai_server.backends.upstream_client import (
    counted_tokens,
    error_message,
    lines_within,
    parse_event,
    stream_faults,
)
from genai_server.errors import UpstreamError
from genai_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from genai_server.telemetry.clock import RequestTelemetry

# Fields upstreams put in their chunks with their own timings.
_REPORTED = ("metrics", "timings")
# Text chunks a choice may carry beyond the tokens asked for (role and empty chunks, engines that split tokens).
_CHUNK_SLACK = 64
_LINES_PER_CHUNK = 3
_MOST_TOKENS = 2**31 - 1  # any count an upstream reports: what an int32 token counter of any engine can hold


class _Shape(NamedTuple):
    """What a relayed chunk carries that we read: its choices, whether they add output (text, reasoning, a tool
    call), and its usage."""

    choices: int
    text: bool
    usage: tuple[int, int] | None  # prompt_tokens, completion_tokens


class OpenAIUpstream(RelayBackend):
    """One model served by an OpenAI-compatible engine elsewhere."""

    name = "openai"
    probe_path = "/models"

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """Relay a chat completion."""
        return await self._relay("/chat/completions", req, stats, "chat.completion", choices=req.n)

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """Relay a text completion."""
        return await self._relay("/completions", req, stats, "text_completion", choices=req.n * len(req.prompts()))

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """vLLM's (and llama-server's) ``/tokenize``, beside the upstream's ``/v1``."""
        data = await self._post_json("/tokenize", self._body(req), at_root=True)
        return _tokens(data)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's (and llama-server's) ``/detokenize``."""
        data = await self._post_json("/detokenize", self._body(req), at_root=True)
        text = data.get("prompt", data.get("content")) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise _malformed()
        return DetokenizeResponse(prompt=text, content=text)

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """``/v1/embeddings`` relayed as it came, under our model id; its prompt tokens counted."""
        data = await self._post_json("/embeddings", {**body, "model": self._upstream_model}, max_bytes=MAX_JSON_BYTES)
        if not isinstance(data, dict):
            raise _malformed()
        data["model"] = self.model_id
        counted = _usage(data.get("usage"), 0)
        if counted is not None:
            stats.prompt_tokens = counted[0]
        return data

    async def relay_native(self, api: str, body: dict[str, Any], stats: RequestTelemetry) -> Result:
        """``/v1/responses`` or ``/v1/messages`` relayed as it came, our model id swapped both ways. A stream's
        events are timed as they arrive (a delta event is a token) and its usage read from its last events; a
        whole answer is relayed as the engine wrote it, its usage read."""
        limit = body.get("max_output_tokens") if api == "responses" else body.get("max_tokens")
        upstream = {**body, "model": self._upstream_model}
        prefixes = self._prefixes(body)  # a Responses input or a Messages conversation, as a stream follows it
        if not body.get("stream"):
            answer = await self._post_json(
                f"/{api}", upstream, max_bytes=MAX_JSON_BYTES, prefixes=prefixes, stats=stats
            )
            if not isinstance(answer, dict):
                raise _malformed()
            if api == "responses":
                self._wrote(answer.get("id"), stats)
            _native_usage(
                api, answer if api == "messages" else {"type": "response.completed", "response": answer}, stats
            )
            return _our_model(answer, self.model_id)
        most = limit if type(limit) is int and 0 < limit <= _MOST_TOKENS else self._max_tokens_limit
        return await self._relay_stream(
            f"/{api}", upstream, stats, lambda response: self._native_events(response, api, stats, most)
        )

    async def native_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Another route of a natively relayed API (a kept response's ``GET`` or ``DELETE``, sent to the replica
        that wrote it), its JSON answer."""
        upstream = {**body, "model": self._upstream_model} if body is not None and "model" in body else body
        kept = path.startswith("/responses/") and self._replicas.follows_prefixes
        prefixes = kept_response(path.removeprefix("/responses/")) if kept else None
        answer = await self._post_json(path, upstream, method=method, prefixes=prefixes)
        return _our_model(answer, self.model_id) if isinstance(answer, dict) else answer

    async def _native_events(
        self, response: aiohttp.ClientResponse, api: str, stats: RequestTelemetry, most: int
    ) -> AsyncGenerator[Response, None]:
        """The engine's own events, until the one that ends its stream; a token per delta, counted against the
        tokens asked for (and every line against a budget: an engine that never ends must not hold the slot)."""
        budget = most + _CHUNK_SLACK
        last = _LAST_EVENTS[api]
        try:
            with stream_faults():
                async for event in _named_events(response, _LINES_PER_NATIVE_EVENT * 4 * budget):
                    kind = event.get("type")
                    if not isinstance(kind, str) or not _EVENT_TYPE.fullmatch(kind):
                        raise _malformed()  # it names the SSE event we write: no line breaks, nothing unknown
                    if isinstance(kind, str) and (kind.endswith(".delta") or kind == "content_block_delta"):
                        stats.on_tokens(1)
                        budget -= 1
                        if budget < 0:
                            raise UpstreamError("The upstream engine sent more than the tokens asked for")
                    _native_usage(api, event, stats)
                    created = event.get("response") if kind == "response.created" else None
                    if isinstance(created, dict):  # its id: where previous_response_id will find it
                        self._wrote(created.get("id"), stats)
                    yield _our_model(event, self.model_id)
                    if kind in last:
                        return
            raise UpstreamError("The upstream stream ended before its last event")
        finally:
            response.close()

    def _body(self, req: BaseModel) -> dict[str, Any]:
        """A request as the client set it, the upstream's name for the model in it."""
        return {**req.model_dump(exclude_unset=True, by_alias=True), "model": self._upstream_model}

    async def _relay(
        self, path: str, req: SamplingRequest, stats: RequestTelemetry, kind: str, *, choices: int
    ) -> Result:
        # What the client set, as it set it (explicit nulls too, every field we do not know): the upstream decides.
        body = req.model_dump(exclude_unset=True, by_alias=True)
        # Always streamed with usage (so that we can time and count it), the client's other stream options kept.
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        body.update(model=self._upstream_model, stream=True, stream_options=options)
        stream = await self._relay_stream(
            path, body, stats, lambda response: self._chunks(response, req, stats, choices)
        )
        if req.stream:
            return stream
        return await _aggregate(stream, kind, assembly_budget(choices, self._max_tokens(req), req.top_logprobs_asked))

    async def _chunks(
        self, response: aiohttp.ClientResponse, req: SamplingRequest, stats: RequestTelemetry, choices: int
    ) -> AsyncGenerator[Response, None]:
        """The upstream's chunks with our model id; tokens timed as they arrive; usage kept where the client gets it."""
        budget = most_generated = choices * (self._max_tokens(req) + _CHUNK_SLACK)
        seen_choice = False
        try:
            # An event is a data line and a blank one; a keep-alive comment now and then is allowed for.
            async for chunk in _sse_json(response, _LINES_PER_CHUNK * budget):
                if "error" in chunk:
                    raise UpstreamError(f"The upstream engine failed: {error_message(chunk['error'])}")
                shape = _checked(chunk, choices, most_generated=most_generated)
                chunk["model"] = self.model_id
                # The engine's own figures go beside ours under metrics.backend_reported when the client gets our
                # figures; when it does not (a stream without usage), they stay where the engine put them.
                _keep_reported(chunk, stats, move=bool(req.include_usage or self._always_usage or not req.stream))
                budget -= 1  # every chunk, with choices or not: an upstream cannot hold the request with empty ones
                if budget < 0:
                    raise UpstreamError("The upstream engine sent more than the tokens asked for")
                if shape.choices:
                    seen_choice = True
                    if shape.text:
                        stats.on_tokens(1)
                    # llama-server puts usage on its last chunk, the one with the finish reason.
                    if shape.usage is not None and not self._final(shape.usage, req, stats):
                        del chunk["usage"]
                    yield chunk
                elif shape.usage is not None and self._final(shape.usage, req, stats):
                    yield chunk
            if not seen_choice:
                raise UpstreamError("The upstream engine sent no choices")
        finally:
            response.close()  # a client that left, or an error: the upstream sees the connection close

    def _final(self, usage: tuple[int, int], req: SamplingRequest, stats: RequestTelemetry) -> bool:
        """Record the upstream's usage; True when the client gets it (it asked, or wants one JSON answer), and then
        the serving layer puts our figures beside it."""
        stats.prompt_tokens = usage[0]
        stats.completion_tokens = usage[1] or stats.completion_tokens
        return bool(req.include_usage or self._always_usage or not req.stream)


def _checked(chunk: dict[str, Any], choices: int, *, most_generated: int) -> _Shape:
    """The chunk's shape checked where we read it: a choice that is not an object, text that is not a string, an
    index beyond the choices asked for, usage that is not counts, are the upstream breaking its API. Written out
    rather than a pydantic model: it runs for every chunk, and this costs a fifth as much (measured: ~1 us vs ~5)."""
    items = chunk.get("choices", [])
    if not isinstance(items, list):
        raise _malformed()
    text = False
    for item in items:
        text = _choice_adds(item, choices) or text
    return _Shape(len(items), text, _usage(chunk.get("usage"), most_generated))


def _choice_adds(item: Any, choices: int) -> bool:
    """Whether one streamed choice adds generated output, its shape checked: text (chat delta or completion text),
    reasoning, or a tool call's piece (each is output; the first of them is the first token)."""
    if not isinstance(item, dict):
        raise _malformed()
    index = item.get("index", 0)
    if type(index) is not int or not 0 <= index < choices:
        raise UpstreamError("The upstream engine sent a choice that was not asked for")
    if not isinstance(item.get("finish_reason") or "", str):
        raise _malformed()
    delta = item.get("delta")
    if delta is not None and not isinstance(delta, dict):
        raise _malformed()
    content = delta.get("content") if delta is not None else item.get("text")
    if content is not None and not isinstance(content, str):
        raise _malformed()
    if content:
        return True
    return delta is not None and bool(
        delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls")
    )


def _usage(usage: Any, most_generated: int) -> tuple[int, int] | None:
    """Usage as counts an engine could have made: every count a whole number from 0 to 2^31 - 1, and no more
    tokens generated than the request allows (``most_generated``). Relayed as it came, 2^63 - 1 inflated the
    Prometheus counters for good."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise _malformed()
    counts = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), usage.get("total_tokens", 0))
    if any(type(count) is not int or not 0 <= count <= _MOST_TOKENS for count in counts):
        raise _malformed()
    return counts[0], counted_tokens(counts[1], most_generated)


def _tokens(data: Any) -> TokenizeResponse:
    """An upstream's tokenize answer: vLLM's (``count``, ``tokens``, ``token_strs``) or llama-server's (``tokens``,
    as ids or, with pieces, as ``{"id", "piece"}`` objects)."""
    items = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise _malformed()
    ids = [item.get("id") if isinstance(item, dict) else item for item in items]
    if not all(type(i) is int and 0 <= i <= _MOST_TOKENS for i in ids):
        raise _malformed()
    pieces = data.get("token_strs")
    if pieces is None and items and all(isinstance(item, dict) for item in items):
        pieces = [str(item.get("piece", "")) for item in items]
    limit = data.get("max_model_len")
    return TokenizeResponse(
        count=len(ids),
        max_model_len=limit if type(limit) is int else None,
        tokens=ids,
        token_strs=pieces if isinstance(pieces, list) and all(isinstance(p, str) for p in pieces) else None,
    )


# The events that end a natively relayed stream, per API.
_LAST_EVENTS = {
    "responses": frozenset({"response.completed", "response.incomplete", "response.failed", "error"}),
    "messages": frozenset({"message_stop", "error"}),
}
_LINES_PER_NATIVE_EVENT = 3  # event:, data:, and the blank line
_EVENT_TYPE = re.compile(r"[a-z_.]{1,128}")


async def _named_events(response: aiohttp.ClientResponse, max_lines: int) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON events of a stream of named events (``event:`` lines are read from the payload's ``type``)."""
    async for raw in lines_within(response, max_lines):
        line = raw.strip()
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            yield parse_event(line[5:].strip())


def _our_model(answer: dict[str, Any], model_id: str) -> dict[str, Any]:
    """Our id where the engine wrote its own: on a response or message, and on those an event carries."""
    for holder in (answer, answer.get("response"), answer.get("message")):
        if isinstance(holder, dict) and "model" in holder:
            holder["model"] = model_id
    return answer


def _native_usage(api: str, event: dict[str, Any], stats: RequestTelemetry) -> None:
    """The token counts a natively relayed answer reports, where its API puts them: a response's ``usage`` on its
    last event; a message's input on ``message_start``, its output on ``message_delta`` (or a whole message's)."""
    kind = event.get("type")
    if api == "responses" and kind in _LAST_EVENTS["responses"]:
        usage = (event.get("response") or {}).get("usage")
        counts = _counts(usage, "input_tokens", "output_tokens")
        if counts is not None:
            stats.prompt_tokens, stats.completion_tokens = counts
            details = usage.get("input_tokens_details") if isinstance(usage, dict) else None
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if type(cached) is int and 0 <= cached <= _MOST_TOKENS:
                stats.cached_prompt_tokens = cached
        return
    holder = event.get("message") if kind == "message_start" else event
    usage = holder.get("usage") if isinstance(holder, dict) else None
    if api != "messages" or not isinstance(usage, dict):
        return
    read = usage.get("cache_read_input_tokens") or 0
    if type(usage.get("input_tokens")) is int and type(read) is int:
        stats.prompt_tokens = min(usage["input_tokens"] + read, _MOST_TOKENS)
        stats.cached_prompt_tokens = read
    if type(usage.get("output_tokens")) is int and kind != "message_start":
        stats.completion_tokens = min(usage["output_tokens"], _MOST_TOKENS)


def _counts(usage: Any, prompt: str, generated: str) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    counts = (usage.get(prompt), usage.get(generated))
    if not all(type(c) is int and 0 <= c <= _MOST_TOKENS for c in counts):
        return None
    return counts[0], counts[1]  # type: ignore[return-value]


def _malformed() -> UpstreamError:
    return UpstreamError("The upstream engine sent a malformed chunk")


async def _sse_json(response: aiohttp.ClientResponse, max_lines: int) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON events of an SSE body up to ``[DONE]``; anything else is the upstream breaking its API. Every line
    counts against ``max_lines``, blank lines and comments too: an upstream that sends only those would otherwise
    hold its request (and the client's slot) for ever."""
    with stream_faults():
        async for raw in lines_within(response, max_lines):
            line = raw.strip()
            if not line.startswith(b"data:"):  # blank lines, comments, other SSE fields
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield parse_event(data)
    raise UpstreamError("The upstream stream ended before [DONE]")


def _keep_reported(chunk: dict[str, Any], stats: RequestTelemetry, *, move: bool) -> None:
    """Keep the upstream's own timing fields in ``backend_reported`` (logs, spans, our figures), and take them out
    of the chunk when ``move``: a client that gets our figures gets them there, once; one that does not keeps them
    where the engine sent them (the gateway never makes the engine's API narrower)."""
    for name in _REPORTED:
        if name in chunk:
            value = chunk.pop(name) if move else chunk[name]
            stats.backend_reported = {**(stats.backend_reported or {}), name: value}


async def _aggregate(chunks: AsyncGenerator[Response, None], kind: str, budget: int) -> dict[str, Any]:
    """A whole response from the stream, for a client that asked for one JSON answer (``assemble.py``)."""
    assembler = Assembler(kind, budget)
    async with aclosing(chunks):
        async for item in chunks:
            assembler.add(item if isinstance(item, dict) else item.model_dump())
    return assembler.response()
