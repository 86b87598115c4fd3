"""Backends: what turns an OpenAI request into a response, behind one interface.

``onnx`` runs the embedded engine; ``openai`` relays to any OpenAI-compatible upstream (vLLM, SGLang,
TGI's Messages API, llama.cpp server, Ollama's /v1). Backends know nothing of the web app: they take parsed
requests and a ``RequestTelemetry`` to fill in, and return a response or an async generator of chunks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from pydantic import BaseModel

from genai_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.load import BackendLoad

# A response is a model of ours, or an upstream's JSON relayed as a dict (with our model id). The serving layer puts
# our figures beside its usage.
Response = BaseModel | dict[str, Any]
Result = Response | AsyncGenerator[Response, None]


def usage(stats: RequestTelemetry) -> Usage:
    """The usage object from the token counts a backend recorded."""
    cached = stats.cached_prompt_tokens
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        prompt_tokens_details=None if cached is None else PromptTokensDetails(cached_tokens=cached),
    )


class Backend(Protocol):
    """One engine behind the API. It owns what it holds (an engine, an HTTP session) from ``start`` to ``close``."""

    name: str

    async def start(self) -> None:
        """Acquire what serving needs (load the model, open the session); raise if that fails."""
        ...

    async def close(self) -> None:
        """Release it; what is still generating ends with ``ShuttingDown``. Safe to call twice."""
        ...

    async def ready(self) -> bool:
        """Whether this backend can serve now (its engine alive, its upstream reachable)."""
        ...

    def load(self) -> BackendLoad:
        """Its load now, as it knows it (read at every scrape: cheap, no I/O)."""
        ...

    def model_cards(self) -> list[ModelCard]:
        """The models this backend serves."""
        ...

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """A chat completion, or its chunk stream when ``req.stream``. ``cache_scope``: whose KV caches it may
        continue (an engine elsewhere scopes its own caches: a relaying backend passes the client's cache_salt)."""
        ...

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """A text completion, or its chunk stream when ``req.stream``; ``cache_scope`` as for ``chat``."""
        ...

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A text's or a conversation's tokens, as the model's tokenizer counts them."""
        ...

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids as text."""
        ...

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """``/v1/embeddings``, relayed where an engine serves it; a clear refusal where none does."""
        ...

    def serves_natively(self, api: str) -> bool:
        """Whether another API (``responses``, ``messages``) goes to the engine as it is, rather than translated to
        chat (``apis/``): only where an upstream serves it itself and the configuration says so."""
        ...

    async def relay_native(self, api: str, body: dict[str, Any], stats: RequestTelemetry) -> Result:
        """That API's request relayed as it came (our model id swapped for the upstream's), its answer or events
        back as the engine sent them, timed and counted."""
        ...

    async def native_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Another of that API's routes (a kept response's ``GET``, say), relayed; its JSON answer."""
        ...
