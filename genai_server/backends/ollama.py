"""The ``ollama`` backend: Ollama's native API (``/api/chat``, ``/api/generate``, NDJSON streams) translated
to the same OpenAI responses every other backend gives, to prove the unification on a non-OpenAI interface.

Ollama's own durations (nanoseconds) are kept under ``backend_reported``; its ``prompt_eval_count`` and
``eval_count`` become ``usage``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genai_server.backends import Response, Result, usage
from genai_server.backends.assemble import MAX_ASSEMBLED_BYTES
from genai_server.backends.choices import ChoiceWriter, Piece
from genai_server.backends.relay import RelayBackend
from genai_server.backends.upstream_client import (
    counted_tokens,
    error_message,
    lines_within,
    parse_event,
    stream_faults,
)
from genai_server.errors import InvalidRequest, UpstreamError
from genai_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FinishReason,
    SamplingRequest,
    check_plain_messages,
    check_supported,
    new_id,
    now,
)
from genai_server.telemetry.clock import RequestTelemetry

# Lines a response may carry beyond the tokens asked for.
_LINE_SLACK = 64
# Ollama's own timing fields, kept as reported.
_REPORTED = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


class OllamaBackend(RelayBackend):
    """One model served by an Ollama server, through its native API."""

    name = "ollama"
    probe_path = "/api/version"

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """``/api/chat``, as an OpenAI chat completion or chunk stream."""
        check_supported(req)
        _no_response_format(req)
        _no_tools(req)
        check_plain_messages(req.messages)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        body = {"model": self._upstream_model, "messages": messages, "stream": True, "options": _options(req)}
        lines = await self._relay_stream("/api/chat", body, stats, lambda response: self._lines(response, req, stats))
        if req.stream:
            return self._chat_chunks(lines, req, stats)
        text, finish = await _collect(lines, stats, "message")
        return ChatCompletion(
            id=new_id("chatcmpl"),
            created=now(),
            model=self.model_id,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finish)],
            usage=usage(stats),
        )

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """``/api/generate`` with ``raw`` (no template), as an OpenAI text completion or chunk stream."""
        check_supported(req)
        _no_response_format(req)
        prompts = req.prompts()
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise InvalidRequest("Ollama takes one text prompt per request", param="prompt")
        body = {
            "model": self._upstream_model,
            "prompt": prompts[0],
            "raw": True,
            "stream": True,
            "options": _options(req),
        }
        lines = await self._relay_stream(
            "/api/generate", body, stats, lambda response: self._lines(response, req, stats)
        )
        if req.stream:
            return self._completion_chunks(lines, req, stats)
        text, finish = await _collect(lines, stats, "response")
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=self.model_id,
            choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
            usage=usage(stats),
        )

    def _lines(
        self, response: aiohttp.ClientResponse, req: SamplingRequest, stats: RequestTelemetry
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The response's lines, at most one per token a choice may bring (and some slack): an endless upstream
        is cut off."""
        return _ndjson(response, stats, max_lines=self._max_tokens(req) + _LINE_SLACK)

    async def _chat_chunks(
        self, lines: AsyncGenerator[dict[str, Any], None], req: SamplingRequest, stats: RequestTelemetry
    ) -> AsyncGenerator[Response, None]:
        chunk_id, created = new_id("chatcmpl"), now()

        def chunk(choice: ChatChunkChoice | None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=chunk_id, created=created, model=self.model_id, choices=[choice] if choice else []
            )

        writer = ChoiceWriter(0, None)
        async for text, finish in _pieces(lines, stats, "message"):
            for choice in writer.choices(Piece(0, text, 0, finish)):
                yield chunk(choice)
        if req.include_usage or self._always_usage:
            yield chunk(None).model_copy(update={"usage": usage(stats)})

    async def _completion_chunks(
        self, lines: AsyncGenerator[dict[str, Any], None], req: SamplingRequest, stats: RequestTelemetry
    ) -> AsyncGenerator[Response, None]:
        chunk_id, created = new_id("cmpl"), now()
        async for text, finish in _pieces(lines, stats, "response"):
            if text or finish:
                yield Completion(
                    id=chunk_id,
                    created=created,
                    model=self.model_id,
                    choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
                )
        if req.include_usage or self._always_usage:
            yield Completion(
                id=chunk_id,
                created=created,
                model=self.model_id,
                choices=[],
                usage=usage(stats),
            )


def _options(req: SamplingRequest) -> dict[str, Any]:
    """OpenAI sampling parameters under Ollama's names; ``n`` > 1 cannot be honoured."""
    if req.n != 1:
        raise InvalidRequest("Ollama generates one choice per request", param="n")
    refused = [("logprobs", req.top_logprobs_asked is not None), ("min_tokens", bool(req.min_tokens))]
    for name, asked in refused:
        if asked:
            raise InvalidRequest(
                f"'{name}' is not supported by the ollama backend", param=name, code="unsupported_parameter"
            )
    options = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "num_predict": req.limit,
        "stop": req.stop_list or None,
        "top_k": req.top_k if req.top_k and req.top_k > 0 else None,
        "repeat_penalty": req.repetition_penalty,
    }
    return {name: value for name, value in options.items() if value is not None}


async def _ndjson(
    response: aiohttp.ClientResponse, stats: RequestTelemetry, max_lines: int
) -> AsyncGenerator[dict[str, Any], None]:
    """Ollama's NDJSON lines up to the one with ``done``, each checked; closing it closes the upstream request."""
    try:
        with stream_faults():
            # Every line counts, blank ones too (twice the lines asked for, and some slack).
            async for raw in lines_within(response, 2 * max_lines + _LINE_SLACK):
                if not raw.strip():
                    continue
                line = parse_event(raw)
                if "error" in line:
                    raise UpstreamError(f"The upstream engine failed: {error_message(line['error'])}")
                max_lines -= 1
                if max_lines < 0:
                    raise UpstreamError("The upstream engine sent more than the tokens asked for")
                yield _bounded(_checked(line), max_lines)
                if line.get("done"):
                    return
        raise UpstreamError("The upstream stream ended before done")
    finally:
        response.close()


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    content: str = ""


class _Line(BaseModel):
    """The fields of an Ollama line we read, with their types; the rest is ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    message: _Message | None = None
    response: str | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = Field(0, ge=0, le=2**31 - 1)  # relayed as it came, 2^63 - 1 inflated the counters
    eval_count: int | None = Field(None, ge=0, le=2**31 - 1)


def _bounded(line: dict[str, Any], most_generated: int) -> dict[str, Any]:
    """The line with its generated count as our counters take it (``counted_tokens``)."""
    counted = line.get("eval_count")
    if isinstance(counted, int):
        line["eval_count"] = counted_tokens(counted, most_generated)
    return line


def _checked(line: dict[str, Any]) -> dict[str, Any]:
    """A line whose fields have the wrong types is Ollama breaking its API: 502."""
    try:
        _Line.model_validate(line)
    except ValidationError:
        raise UpstreamError("The upstream engine sent a malformed line") from None
    return line


async def _pieces(
    lines: AsyncGenerator[dict[str, Any], None], stats: RequestTelemetry, field: str
) -> AsyncGenerator[tuple[str, FinishReason | None], None]:
    """(text, finish) per line, timing each token and taking usage and durations from the last line."""
    try:
        async for line in lines:
            value = line.get(field)
            text = str(value.get("content", "")) if isinstance(value, dict) else str(value or "")
            if line.get("done"):
                stats.prompt_tokens = int(line.get("prompt_eval_count", 0))
                stats.backend_reported = {name: line[name] for name in _REPORTED if name in line}
                if text:
                    stats.on_tokens(1)
                counted = line.get("eval_count")  # a null count is no count (it was int(None): a 500)
                if isinstance(counted, int):
                    stats.completion_tokens = counted
                yield text, "length" if line.get("done_reason") == "length" else "stop"
                return
            if text:
                stats.on_tokens(1)
            yield text, None
    finally:
        await lines.aclose()


async def _collect(
    lines: AsyncGenerator[dict[str, Any], None], stats: RequestTelemetry, field: str
) -> tuple[str, FinishReason]:
    texts: list[str] = []
    size = 0
    finish: FinishReason = "stop"
    async for text, done in _pieces(lines, stats, field):
        size += len(text.encode())
        if size > MAX_ASSEMBLED_BYTES:  # the same bound as an assembled OpenAI answer (a 150 MB one came back)
            raise UpstreamError("The upstream engine's answer is too large to assemble")
        texts.append(text)
        finish = done or finish
    return "".join(texts), finish


def _no_response_format(req: SamplingRequest) -> None:
    """Ollama's own ``format`` is not translated yet: structured output is refused rather than silently dropped."""
    if req.response_format is not None and req.response_format.type != "text":
        raise InvalidRequest(
            "'response_format' is not supported by the ollama backend",
            param="response_format",
            code="unsupported_parameter",
        )


def _no_tools(req: ChatCompletionRequest) -> None:
    """Ollama's native tool calling is not translated yet: tools are refused rather than silently dropped (a
    ``tool_choice`` of ``none`` with them asks for nothing and is accepted)."""
    if req.tools and req.tool_choice != "none":
        raise InvalidRequest(
            "'tools' is not supported by the ollama backend", param="tools", code="unsupported_parameter"
        )
