"""The ``openai`` backend: relays requests to any OpenAI-compatible upstream (vLLM, SGLang, TGI's Messages API,
llama.cpp server, Ollama's /v1) over one shared aiohttp ``ClientSession``.

The upstream is always asked to stream, with usage, so this server times every request itself (TTFT, ITL) even
when the client asked for one JSON answer; chunks are relayed as they arrive. The upstream's own timing fields
(vLLM ``metrics``, llama.cpp ``timings``) are kept under ``backend_reported``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from genai_server.backends import Response, Result
from genai_server.backends.upstream import error_message, parse_event, post_upstream, stream_faults
from genai_server.errors import UpstreamError
from genai_server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, SamplingRequest, now
from genai_server.telemetry import RequestTelemetry

# Fields upstreams put in their chunks with their own timings.
_REPORTED = ("metrics", "timings")


class OpenAIUpstream:
    """One model served by an OpenAI-compatible engine elsewhere."""

    name = "openai"

    def __init__(self, session: aiohttp.ClientSession, base_url: str, model_id: str, upstream_model: str, *,
                 api_key: str | None = None, always_usage: bool = False) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self.model_id = model_id
        self._upstream_model = upstream_model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._always_usage = always_usage
        self._created = now()

    def model_cards(self) -> list[ModelCard]:
        """The one model this backend relays to."""
        return [ModelCard(id=self.model_id, created=self._created)]

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry) -> Result:
        """Relay a chat completion."""
        return await self._relay("/chat/completions", req, stats, "chat.completion")

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry) -> Result:
        """Relay a text completion."""
        return await self._relay("/completions", req, stats, "text_completion")

    async def _relay(self, path: str, req: SamplingRequest, stats: RequestTelemetry, kind: str) -> Result:
        body = req.model_dump(exclude_none=True)
        body.update(model=self._upstream_model, stream=True, stream_options={"include_usage": True})
        response = await post_upstream(self._session, self._base_url + path, body, self._headers)
        stats.on_admitted(time.perf_counter())  # our part of the wait ends when the upstream has the request
        chunks = self._chunks(response, req, stats)
        if req.stream:
            return chunks
        return await _aggregate(chunks, kind)

    async def _chunks(self, response: aiohttp.ClientResponse, req: SamplingRequest,
                      stats: RequestTelemetry) -> AsyncGenerator[Response, None]:
        """The upstream's chunks with our model id; tokens timed as they arrive; the usage chunk gets our metrics."""
        try:
            async for chunk in _sse_json(response):
                if "error" in chunk:
                    raise UpstreamError(f"The upstream engine failed: {error_message(chunk['error'])}")
                chunk["model"] = self.model_id
                _keep_reported(chunk, stats)
                if chunk.get("choices"):
                    if any(_text(choice) for choice in chunk["choices"]):
                        stats.on_tokens(1)
                    yield chunk
                elif chunk.get("usage"):
                    final = self._final(chunk, req, stats)
                    if final is not None:
                        yield final
        finally:
            response.close()  # a client that left, or an error: the upstream sees the connection close
            stats.on_end()

    def _final(self, chunk: dict[str, Any], req: SamplingRequest, stats: RequestTelemetry) -> dict[str, Any] | None:
        usage = chunk["usage"]
        stats.prompt_tokens = int(usage.get("prompt_tokens", 0))
        stats.completion_tokens = int(usage.get("completion_tokens", stats.completion_tokens))
        stats.on_end()
        if not (req.include_usage or self._always_usage or not req.stream):
            return None
        chunk["metrics"] = stats.metrics().model_dump()
        chunk["performance"] = stats.performance().model_dump()
        return chunk


async def _sse_json(response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON events of an SSE body up to ``[DONE]``; anything else is the upstream breaking its API."""
    with stream_faults():
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):  # blank lines, comments, other SSE fields
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield parse_event(data)
    raise UpstreamError("The upstream stream ended before [DONE]")


def _text(choice: dict[str, Any]) -> str:
    """New text in a streamed choice, chat or completion."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


def _keep_reported(chunk: dict[str, Any], stats: RequestTelemetry) -> None:
    """Move the upstream's own timing fields out of the chunk into ``backend_reported``."""
    for name in _REPORTED:
        if name in chunk:
            stats.backend_reported = {**(stats.backend_reported or {}), name: chunk.pop(name)}


async def _aggregate(chunks: AsyncGenerator[Response, None], kind: str) -> dict[str, Any]:
    """A whole response from the stream, for a client that asked for one JSON answer."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str | None] = {}
    head: dict[str, Any] = {}
    async for item in chunks:
        chunk = item if isinstance(item, dict) else item.model_dump()
        head = head or chunk
        for choice in chunk.get("choices", []):
            index = int(choice.get("index", 0))
            texts.setdefault(index, []).append(_text(choice))
            finishes[index] = choice.get("finish_reason") or finishes.get(index)
        for name in ("usage", "metrics", "performance"):
            if chunk.get(name):
                head[name] = chunk[name]
    choices = [_choice(kind, i, "".join(texts[i]), finishes.get(i)) for i in sorted(texts)]
    return {"id": head.get("id", ""), "object": kind, "created": head.get("created", now()),
            "model": head.get("model"), "choices": choices, "usage": head.get("usage"),
            "metrics": head.get("metrics"), "performance": head.get("performance")}


def _choice(kind: str, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if kind == "chat.completion":
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
