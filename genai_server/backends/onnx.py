"""The embedded backend: OpenAI requests served by the ONNX Runtime GenAI engine in this process.

Templates, context checks, ``n``, server-side stop strings and exact usage live here; the engine
itself (``engine.py``) only turns token ids into token deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from genai_server.backends import Result, usage
from genai_server.backends.choices import ChoiceWriter, Piece, chat_choice, completion_logprobs
from genai_server.backends.reasoning import (
    EMPTY_SECTION,
    OPEN,
    ReasoningSplitter,
    opens_thinking,
    prompt_opens_section,
)
from genai_server.embedded.call_arguments import ArgumentCheck
from genai_server.embedded.engine import EmbeddedEngine, GuidanceRejected, SamplingOptions
from genai_server.embedded.logprobs import TokenLogprob
from genai_server.embedded.schema_bounds import SchemaRefused, bounded_schema
from genai_server.embedded.stop_strings import StopMatcher
from genai_server.embedded.tool_calls import CallFormat, CallReader, Choice, Function, describe_tools, detect_format
from genai_server.errors import ContextLengthExceeded, InvalidRequest, ShuttingDown
from genai_server.protocol import (
    INT32_MAX,
    OPENAI_FORMATS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    FinishReason,
    ModelCard,
    NamedToolChoice,
    ResponseFormat,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    Tool,
    as_float32,
    check_supported,
    check_text_messages,
    engine_seed,
    new_id,
    now,
)
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.load import BackendLoad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sequence:
    """One sequence to generate: which choice it is, its prompt and how to sample."""

    index: int
    prompt: list[int]
    options: SamplingOptions
    stops: list[str]
    guided: str = "response_format"  # the parameter whose grammar it follows: what a refused grammar is blamed on
    cache_scope: str = ""  # whose conversation it continues or leaves kept (see ``serving.cache_scope``)
    # A reasoning model's answer: None, no thinking read out; else whether the prompt already opened the section.
    thinking: bool | None = None


@dataclass(frozen=True, kw_only=True)
class OnnxConfig:
    """What the embedded backend is built with besides its engine (``factory.py`` fills it in from the settings)."""

    model_id: str  # the id clients ask for
    created: int  # the model card's creation time
    always_usage: bool = False  # STREAM_USAGE_ALWAYS: streams end with usage even when the client did not ask
    max_prompt_tokens: int | None = None  # MAX_PROMPT_TOKENS
    # MAX_TOKENS_LIMIT: a request that sets no limit gets the rest of the context, at most this.
    max_tokens_limit: int | None = None


class OnnxBackend:
    """Chat and text completions for one model on the embedded engine."""

    name = "onnx"

    def __init__(
        self, engine: EmbeddedEngine, config: OnnxConfig, *, on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        """``on_failure``: called once the engine can no longer generate (the web app stops the server)."""
        self.engine = engine
        engine.on_failure = on_failure
        self._max_prompt_tokens = config.max_prompt_tokens
        self._max_tokens_limit = config.max_tokens_limit
        self.model_id = config.model_id
        self.created = config.created
        self.always_usage = config.always_usage
        self._calls, self._knows_tools = detect_format(engine.facts.chat_template)  # the fallback's until start()
        self._reasons = opens_thinking(engine.facts.chat_template)

    async def start(self) -> None:
        """Load the model (``ModelLoadingFailed`` with the reason if it cannot be)."""
        started = time.perf_counter()
        await self.engine.start()
        # The template decides how the model writes tool calls: read once, not per request.
        self._calls, self._knows_tools = detect_format(self.engine.facts.chat_template)
        self._reasons = opens_thinking(self.engine.facts.chat_template)  # its answers may begin with thinking
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model_path": str(self.engine.model_path),
                    "model": self.model_id,
                    "load_time_ms": round((time.perf_counter() - started) * 1000, 1),
                    "context_length": self.engine.facts.context_length,
                    "threads": self.engine.facts.threads,
                }
            },
        )

    async def close(self) -> None:
        """Stop the engine: sequences still running end with ``ShuttingDown``."""
        await self.engine.close()

    async def ready(self) -> bool:
        """The engine can generate now (not while its process restarts)."""
        return self.engine.ready()

    def load(self) -> BackendLoad:
        """Sequences waiting for a batch to start, and the share of the KV-cache budget running ones hold."""
        return BackendLoad(waiting=self.engine.waiting_sequences(), kv_cache_usage=self.engine.kv_cache_usage())

    def model_cards(self) -> list[ModelCard]:
        """The one model this backend serves."""
        length = self.engine.facts.context_length
        return [ModelCard(id=self.model_id, created=self.created, max_model_len=length, context_length=length)]

    # ---- chat --------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, stats: RequestTelemetry, cache_scope: str = ""
    ) -> ChatCompletion | AsyncGenerator[ChatCompletionChunk, None]:
        """A chat completion, or its chunk stream when ``req.stream``."""
        check_supported(req)
        self._check_conversation(req)
        tools = _tool_use(req, self._calls, req.limit or self._max_tokens_limit or self.engine.facts.context_length)
        prompt, thinking = await self._thinking(req, await self._chat_prompt(req), tools)
        seqs = self._plan(req, [prompt], param="messages", tools=tools, cache_scope=cache_scope, thinking=thinking)
        stats.prompt_tokens = len(prompt)
        readers = {s.index: CallReader(self._calls, tools.functions) if tools and tools.parse else None for s in seqs}
        if req.stream:
            return self._chat_stream(req, seqs, stats, readers)
        asked = req.top_logprobs_asked is not None
        choices = [
            chat_choice(i, text, finish, readers[i], logprobs if asked else None, reasoning)
            for i, (text, finish, logprobs, reasoning) in enumerate(await self._collect(seqs, stats))
        ]
        return ChatCompletion(
            id=new_id("chatcmpl"), created=now(), model=self.model_id, choices=choices, usage=usage(stats)
        )

    async def _thinking(
        self, req: ChatCompletionRequest, prompt: list[int], tools: _ToolUse | None
    ) -> tuple[list[int], bool | None]:
        """A reasoning model's prompt, and whether its thinking is read out of the answer (None: not), opened by the
        prompt already. Not under a grammar (tools, a response format): the grammar leaves no room for a section.
        ``chat_template_kwargs.enable_thinking: false`` on a template that reads it closes the section empty, as
        Qwen3's template does (the runtime renders templates without extra variables)."""
        formatted = req.response_format is not None and req.response_format.type != "text"
        if not self._reasons or formatted or (tools is not None and tools.guidance is not None):
            return prompt, None
        kwargs = (req.model_extra or {}).get("chat_template_kwargs")
        disabled = isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False
        if disabled and "enable_thinking" in self.engine.facts.chat_template:
            return prompt + await self._tokens_of(EMPTY_SECTION), None
        # Text, or the tag's own ids: a tokenizer whose decoder skips special tokens would hide a special <think>.
        [tail] = await self.engine.detokenize([prompt[-16:]])
        tag = await self._tokens_of(OPEN)
        return prompt, prompt_opens_section(tail) or _ends_with(prompt, tag)

    async def _tokens_of(self, text: str) -> list[int]:
        """A text of the server's own (a tag) as tokens, without the beginning-of-sequence token a tokenizer may
        put first."""
        [ids] = await self.engine.tokenize([text])
        bos = self.engine.facts.bos_token_id
        return ids[1:] if ids and ids[0] == bos else ids

    def _check_conversation(self, req: ChatCompletionRequest) -> None:
        """Text messages only, and every character the prompt will hold (history tool calls and tools included)
        checked before any of it is parsed or tokenised (3.8 MB of call arguments were tokenised before the 400)."""
        check_text_messages(req.messages)
        self._check_text_size(_text_size(req), param="messages")

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The conversation (its size checked) rendered with the model's template and tokenised."""
        messages = _template_messages(req, self._calls, self._knows_tools)
        rendered = [t.model_dump(exclude_none=True) for t in req.tools or []] if self._knows_tools else None
        return await self.engine.chat_prompt(messages, rendered)

    async def _chat_stream(
        self,
        req: ChatCompletionRequest,
        seqs: list[_Sequence],
        stats: RequestTelemetry,
        readers: dict[int, CallReader | None],
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        chunk_id, created = new_id("chatcmpl"), now()
        asked = req.top_logprobs_asked is not None
        writers = {i: ChoiceWriter(i, reader, logprobs=asked) for i, reader in readers.items()}
        # aclosing: a client that leaves closes this generator, and that must reach the engine now.
        async with aclosing(self._run(seqs, stats)) as pieces:
            async for piece in pieces:
                for choice in writers[piece.index].choices(piece):
                    yield ChatCompletionChunk(id=chunk_id, created=created, model=self.model_id, choices=[choice])
        if req.include_usage or self.always_usage:
            yield ChatCompletionChunk(
                id=chunk_id,
                created=created,
                model=self.model_id,
                choices=[],
                usage=usage(stats),
            )

    # ---- tokenizing ----------------------------------------------------------------------

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A text's tokens, or a conversation's through the chat template (with the generation prompt, as a chat
        request's prompt is: the template is always rendered with it here)."""
        if req.messages is not None:
            if not req.add_generation_prompt:
                raise InvalidRequest(
                    "add_generation_prompt: false is not supported by the embedded engine",
                    param="add_generation_prompt",
                    code="unsupported_parameter",
                )
            chat = ChatCompletionRequest(model=self.model_id, messages=req.messages, tools=req.tools)
            self._check_conversation(chat)
            ids = await self._chat_prompt(chat)
        else:
            text = req.text or ""
            self._check_text_size(len(text), param="prompt")
            [ids] = await self.engine.tokenize([text]) if text else [[]]
            bos = self.engine.facts.bos_token_id
            if not req.special_tokens and ids and ids[0] == bos:
                ids = ids[1:]
        pieces = await self.engine.detokenize([[token] for token in ids]) if req.pieces else None
        length = self.engine.facts.context_length
        return TokenizeResponse(count=len(ids), max_model_len=length, tokens=ids, token_strs=pieces)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids (each checked against the vocabulary, and no more than a sequence holds: the tokenizer is native
        code) as text."""
        if len(req.tokens) > self.engine.facts.context_length:
            raise InvalidRequest(
                f"At most {self.engine.facts.context_length} tokens (the model's context)", param="tokens"
            )
        self._check_token_ids(req.tokens, param="tokens")
        [text] = await self.engine.detokenize([req.tokens])
        return DetokenizeResponse(prompt=text, content=text)

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """A generative model has no embeddings to give."""
        raise no_embeddings(self.model_id)

    # ---- other APIs ----------------------------------------------------------------------

    def serves_natively(self, api: str) -> bool:
        """The engine speaks chat only: every other API is translated (``apis/``)."""
        return False

    async def relay_native(self, api: str, body: dict[str, Any], stats: RequestTelemetry) -> Result:
        """Never asked: ``serves_natively`` says no."""
        raise InvalidRequest(f"/v1/{api} is translated for the embedded engine", param="model")

    async def native_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """As ``relay_native``."""
        raise InvalidRequest(f"{path} is not relayed for the embedded engine", param="model")

    # ---- completions -------------------------------------------------------------------

    async def complete(
        self, req: CompletionRequest, stats: RequestTelemetry, cache_scope: str = ""
    ) -> Completion | AsyncGenerator[Completion, None]:
        """A text completion (raw prompt, no template), or its chunk stream when ``req.stream``."""
        check_supported(req)
        given = req.prompts()
        for prompt in given:  # checked before any tokenising
            if isinstance(prompt, list):
                self._check_token_ids(prompt)
            else:
                self._check_text_size(len(prompt), param="prompt")
        texts = [p for p in given if not isinstance(p, list)]
        tokenized = iter(await self.engine.tokenize(texts) if texts else [])
        prompts = [p if isinstance(p, list) else next(tokenized) for p in given]
        seqs = self._plan(req, prompts, param="prompt", cache_scope=cache_scope)
        stats.prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return self._complete_stream(req, seqs, stats)
        asked = req.top_logprobs_asked is not None
        choices = [
            CompletionChoice(
                index=i, text=text, finish_reason=finish, logprobs=completion_logprobs(lps, 0) if asked else None
            )
            for i, (text, finish, lps, _) in enumerate(await self._collect(seqs, stats))
        ]
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=self.model_id,
            choices=choices,
            usage=usage(stats),
        )

    async def _complete_stream(
        self, req: CompletionRequest, seqs: list[_Sequence], stats: RequestTelemetry
    ) -> AsyncGenerator[Completion, None]:
        chunk_id, created = new_id("cmpl"), now()
        asked = req.top_logprobs_asked is not None
        offsets = dict.fromkeys((s.index for s in seqs), 0)
        async with aclosing(self._run(seqs, stats)) as pieces:
            async for piece in pieces:
                if piece.text or piece.finish:
                    logprobs = completion_logprobs(piece.logprobs, offsets[piece.index]) if asked else None
                    offsets[piece.index] += len(piece.text)
                    choice = CompletionChoice(
                        index=piece.index, text=piece.text, finish_reason=piece.finish, logprobs=logprobs
                    )
                    yield Completion(id=chunk_id, created=created, model=self.model_id, choices=[choice])
        if req.include_usage or self.always_usage:
            yield Completion(
                id=chunk_id,
                created=created,
                model=self.model_id,
                choices=[],
                usage=usage(stats),
            )

    # ---- shared ------------------------------------------------------------------------

    def _check_text_size(self, chars: int, *, param: str) -> None:
        """Refuse a text that cannot fit before tokenising it: a text of C characters (at least C bytes) has at
        least C / (the most bytes one token decodes to) tokens. Tokenising runs off the event loop, but a 4 MB
        message would still cost a core for a quarter of a second."""
        per_token = self.engine.facts.max_token_bytes
        limit = min(self.engine.facts.context_length, self._max_prompt_tokens or self.engine.facts.context_length)
        if per_token and chars > limit * per_token:
            code = "context_length_exceeded" if limit == self.engine.facts.context_length else "prompt_too_long"
            raise InvalidRequest(
                f"The prompt has at least {chars // per_token} tokens; at most {limit} are allowed",
                param=param,
                code=code,
            )

    def _check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        """Token ids, each checked against the vocabulary (or the engine's int32 when it is unknown): the engine
        would fail on it."""
        upper = self.engine.facts.vocab_size or INT32_MAX + 1
        if any(not 0 <= token < upper for token in ids):
            raise InvalidRequest(f"Token ids must be between 0 and {upper - 1}", param=param)

    def _plan(
        self,
        req: SamplingRequest,
        prompts: Sequence[list[int]],
        *,
        param: str,
        tools: _ToolUse | None = None,
        cache_scope: str = "",
        thinking: bool | None = None,
    ) -> list[_Sequence]:
        """Check the prompts against the context and make ``n`` sequences per prompt."""
        context = self.engine.facts.context_length
        sequences = []
        for p, prompt in enumerate(prompts):
            if not prompt:
                raise InvalidRequest("the prompt must not be empty", param=param)
            if self._max_prompt_tokens is not None and len(prompt) > self._max_prompt_tokens:
                raise InvalidRequest(
                    f"The prompt has {len(prompt)} tokens; at most {self._max_prompt_tokens} are "
                    "allowed (MAX_PROMPT_TOKENS)",
                    param=param,
                    code="prompt_too_long",
                )
            room = context - len(prompt)
            if room < 1 or (req.limit is not None and req.limit > room):
                asked = len(prompt) + (req.limit or 1)
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{asked} tokens ({len(prompt)} in the prompt, {req.limit or 1} for the completion).",
                    param=req.limit_param if room >= 1 else param,
                )
            max_tokens = req.limit or min(room, self._max_tokens_limit or room)
            # One grammar per sequence: the tools' (which holds response_format's as its answer) or response_format's.
            guidance: tuple[str, str] | None
            if tools is not None and tools.guidance is not None:
                guidance, guided = tools.guidance, "tools"
            else:
                guidance, guided = _guidance(req.response_format, max_tokens), "response_format"
            options = _sampling(req, max_tokens, self.engine.facts.vocab_size, guidance)
            for j in range(req.n):
                seed = None if req.seed is None else engine_seed(req.seed + j)
                options_j = replace(options, seed=seed)
                sequences.append(
                    _Sequence(p * req.n + j, prompt, options_j, req.stop_list, guided, cache_scope, thinking)
                )
        return sequences

    async def _collect(
        self, seqs: list[_Sequence], stats: RequestTelemetry
    ) -> list[tuple[str, FinishReason, list[TokenLogprob], str]]:
        """Run every sequence to its end; returns (text, finish, logprobs, reasoning) per choice index."""
        texts: dict[int, list[str]] = {s.index: [] for s in seqs}
        thoughts: dict[int, list[str]] = {s.index: [] for s in seqs}
        logprobs: dict[int, list[TokenLogprob]] = {s.index: [] for s in seqs}
        finishes: dict[int, FinishReason] = {}
        async with aclosing(self._run(seqs, stats)) as pieces:
            async for piece in pieces:
                texts[piece.index].append(piece.text)
                thoughts[piece.index].append(piece.reasoning)
                logprobs[piece.index].extend(piece.logprobs)
                if piece.finish:
                    finishes[piece.index] = piece.finish
        return [("".join(texts[i]), finishes[i], logprobs[i], "".join(thoughts[i])) for i in sorted(texts)]

    async def _run(self, seqs: list[_Sequence], stats: RequestTelemetry) -> AsyncGenerator[Piece, None]:
        """Pieces of all sequences as they arrive, with their tokens and times recorded in ``stats``."""
        stats.cached_prompt_tokens = 0
        cached: dict[int, int] = {}  # by prompt: its sequences may each reuse a different length
        streams = [self._sequence(s, stats, cached) for s in seqs]
        merged = streams[0] if len(streams) == 1 else _merge(streams)
        try:
            async for piece in merged:
                stats.on_tokens(piece.tokens)
                yield piece
        finally:
            await merged.aclose()

    async def _sequence(
        self, seq: _Sequence, stats: RequestTelemetry, cached: dict[int, int]
    ) -> AsyncGenerator[Piece, None]:
        """One choice's pieces, with stop sequences applied and a reasoning model's thinking read out."""
        matcher = StopMatcher(seq.stops)
        piece = _PieceMaker(seq)
        stream = self.engine.generate(seq.prompt, seq.options, seq.cache_scope)
        try:
            async for delta in stream:
                if delta.admitted_at is not None:
                    stats.on_admitted(delta.admitted_at)
                if delta.cached_tokens > cached.get(id(seq.prompt), 0):
                    cached[id(seq.prompt)] = delta.cached_tokens
                    stats.cached_prompt_tokens = sum(cached.values())
                text, stopped = matcher.feed(delta.text)
                if stopped:
                    yield piece(text, delta.tokens, "stop", delta.logprobs)
                    return
                if delta.finish == "cancelled":
                    raise ShuttingDown("The server is shutting down; this generation was not finished")
                if delta.finish is not None:
                    yield piece(text + matcher.flush(), delta.tokens, delta.finish, delta.logprobs)
                    return
                yield piece(text, delta.tokens, None, delta.logprobs)
        except GuidanceRejected as exc:  # a schema the engine cannot compile is the client's error
            raise InvalidRequest(f"{seq.guided} cannot be followed: {exc}", param=seq.guided) from None
        finally:
            await stream.aclose()


def no_embeddings(model_id: str) -> InvalidRequest:
    """The refusal of ``/v1/embeddings`` for an embedded (generative) model, loaded or not."""
    return InvalidRequest(
        f"The model '{model_id}' is a generative ONNX Runtime GenAI model and serves no embeddings; "
        "serve an embedding model through a gateway backend (BACKEND=openai) for /v1/embeddings",
        param="model",
        code="model_not_supported",
    )


class _PieceMaker:
    """A sequence's pieces, its text split into thinking and answer when it is a reasoning model's."""

    def __init__(self, seq: _Sequence) -> None:
        self._index = seq.index
        self._splitter = None if seq.thinking is None else ReasoningSplitter(opened=seq.thinking)

    def __call__(
        self, text: str, tokens: int, finish: FinishReason | None, logprobs: tuple[TokenLogprob, ...]
    ) -> Piece:
        if self._splitter is None:
            return Piece(self._index, text, tokens, finish, logprobs)
        reasoning, answer = self._splitter.feed(text)
        if finish is not None:
            more_reasoning, more_answer = self._splitter.flush()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        return Piece(self._index, answer, tokens, finish, logprobs, reasoning)


async def _merge(streams: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[Piece, None]:
    """Interleave several choices' pieces in arrival order; closing it cancels them all."""
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Piece, None]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait(piece)
            queue.put_nowait(None)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer and re-raised there
            queue.put_nowait(exc)
        finally:
            await stream.aclose()  # cancels the engine sequence now, not whenever it is collected

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sampling(
    req: SamplingRequest, max_tokens: int, vocab_size: int, guidance: tuple[str, str] | None
) -> SamplingOptions:
    """OpenAI defaults: temperature 1, top_p 1, no top_k; values as the engine's float32 sees them (a temperature
    that is 0 as a float32 is greedy), a top_k of the whole vocabulary or more is no top_k (the engine refuses it),
    and a top_k of 1, which keeps only the most likely token, is greedy whatever the temperature (as in vLLM; the
    engine refuses a temperature beside it)."""
    temperature = as_float32(1.0 if req.temperature is None else req.temperature)
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    if vocab_size and top_k >= vocab_size:
        top_k = 0
    if top_k == 1:
        temperature, top_k = 0.0, 0
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=as_float32(1.0 if req.top_p is None else req.top_p),
        top_k=top_k,
        guidance=guidance,
        repetition_penalty=as_float32(req.repetition_penalty or 1.0),
        min_tokens=min(req.min_tokens or 0, max_tokens),
        logprobs=req.top_logprobs_asked,
    )


def _guidance(response_format: ResponseFormat | None, max_tokens: int) -> tuple[str, str] | None:
    """``response_format`` as the engine's JSON-schema guidance."""
    schema = _format_schema(response_format, max_tokens)
    return None if schema is None else ("json_schema", schema)


def _format_schema(response_format: ResponseFormat | None, max_tokens: int) -> str | None:
    """The JSON schema ``response_format`` asks for: any object for ``json_object``, the schema for
    ``json_schema`` (enforced whether or not ``strict`` is set). Whitespace between tokens is not free unless the
    schema's own ``x-guidance`` says so: a weak model would otherwise fill its answer with it (measured: the
    bundled model wrote tabs until max_tokens)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type not in OPENAI_FORMATS:
        raise InvalidRequest(
            f"response_format type {response_format.type!r} is not supported here: use one of "
            f"{', '.join(OPENAI_FORMATS)}",
            param="response_format.type",
        )
    if response_format.type == "json_object" or response_format.json_schema is None:
        schema: dict[str, Any] = {"type": "object"}
    else:
        schema = _bounded(response_format.json_schema.schema_ or {}, max_tokens, "response_format")
    options = schema.get("x-guidance")
    schema["x-guidance"] = {"whitespace_flexible": False, **(options if isinstance(options, dict) else {})}
    return json.dumps(schema)


# ---- tools ---------------------------------------------------------------------------

# OpenAI's rule for a function's name.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class _ToolUse:
    """What a request's tools ask of generation: a grammar (None: free text), and whether to read calls back."""

    guidance: tuple[str, str] | None
    parse: bool
    # The functions offered, each with its arguments' check: a call to any other is not read as one.
    functions: Mapping[str, ArgumentCheck] = field(default_factory=dict)


def _tool_use(req: ChatCompletionRequest, fmt: CallFormat, max_tokens: int) -> _ToolUse | None:
    """Check ``tools`` and ``tool_choice`` and plan the grammar. ``none`` still shows the model its tools (as vLLM
    does by default) but neither constrains nor reads calls; ``auto`` allows text or calls, ``required`` one call
    or more, a named choice that function only; ``parallel_tool_calls: false`` one call at most."""
    if not req.tools:
        return None
    functions = [_function(i, tool, max_tokens) for i, tool in enumerate(req.tools)]
    names = {f.name for f in functions}
    choice = _choice(req.tool_choice, names)
    if choice == "none":
        return _ToolUse(None, parse=False)
    answer = _format_schema(req.response_format, max_tokens)
    grammar = fmt.grammar(functions, choice, parallel=req.parallel_tool_calls is not False, answer=answer)
    checks = {f.name: ArgumentCheck(f.parameters) for f in functions}
    return _ToolUse(("lark_grammar", grammar), parse=True, functions=checks)


def _function(index: int, tool: Tool, max_tokens: int) -> Function:
    if tool.type != "function" or tool.function is None:
        raise InvalidRequest(
            f"Tools of type '{tool.type}' are not supported; use 'function'",
            param=f"tools.{index}.type",
            code="unsupported_parameter",
        )
    if not _FUNCTION_NAME.fullmatch(tool.function.name):
        raise InvalidRequest(
            "A function name is 1-64 letters, digits, underscores and dashes", param=f"tools.{index}.function.name"
        )
    parameters = tool.function.parameters
    param = f"tools.{index}.function.parameters"
    return Function(tool.function.name, None if parameters is None else _bounded(parameters, max_tokens, param))


def _bounded(schema: dict[str, Any], max_tokens: int, param: str) -> dict[str, Any]:
    """A client's JSON schema within the bounds the engine's grammar compiler can take (``schema_bounds.py``), or
    a 400 naming where it came from."""
    try:
        return bounded_schema(schema, max_tokens)
    except SchemaRefused as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param, code="schema_too_complex") from None


def _choice(choice: str | NamedToolChoice | None, names: set[str]) -> Choice:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice  # type: ignore[return-value]  # the request model allows only the three
    name = (choice.function or {}).get("name")
    if choice.type != "function" or not isinstance(name, str):
        raise InvalidRequest(
            "tool_choice must name a function: {'type': 'function', 'function': {'name': ...}}", param="tool_choice"
        )
    if name not in names:
        raise InvalidRequest(f"tool_choice names '{name}', which is not in tools", param="tool_choice")
    return ("function", name)


def _ends_with(prompt: list[int], tag: list[int], slack: int = 2) -> bool:
    """Whether ``tag``'s tokens stand at the end of ``prompt``, give or take ``slack`` tokens after it (a line
    break)."""
    if not tag:
        return False
    tail = prompt[-(len(tag) + slack) :]
    return any(tail[i : i + len(tag)] == tag for i in range(len(tail) - len(tag) + 1))


def _template_messages(req: ChatCompletionRequest, fmt: CallFormat, knows_tools: bool) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it. A template that knows nothing of tools gets them described
    in the system message and the history's calls written out as text, in the format the model is asked for."""
    messages = [_template_message(m, fmt, knows_tools) for m in req.messages]
    if req.tools and not knows_tools and req.tool_choice != "none":
        described = describe_tools([t.model_dump(exclude_none=True) for t in req.tools])
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{described}"
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages


def _template_message(message: ChatMessage, fmt: CallFormat, knows_tools: bool) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": _template_role(message.role), "content": message.text()}
    if message.role in ("tool", "function"):
        rendered["role"] = "tool"  # the legacy function role is a tool result under another name
        rendered.update((k, v) for k, v in (("tool_call_id", message.tool_call_id), ("name", message.name)) if v)
    if message.tool_calls:
        calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in message.tool_calls]
        if knows_tools:  # templates (Hugging Face's convention) take the arguments as an object
            ids = [c.id for c in message.tool_calls]
            rendered["tool_calls"] = [
                {"id": i, "type": "function", "function": call} for i, call in zip(ids, calls, strict=True)
            ]
        else:
            rendered["content"] = "\n".join(filter(None, [rendered["content"], fmt.write(calls)]))
    return rendered


def _text_size(req: ChatCompletionRequest) -> int:
    """Characters of the messages, their tool calls and the tools: at least what the template will render."""
    calls = sum(len(c.function.arguments) + len(c.function.name) for m in req.messages for c in m.tool_calls or [])
    tools = len(json.dumps([t.model_dump(exclude_none=True) for t in req.tools or []]))
    return sum(len(m.text()) for m in req.messages) + calls + tools


def _arguments(text: str) -> Any:
    """A call's arguments as an object when they are JSON (they are, when the model wrote them), else as sent
    (JSON nested thousands deep too: parsed, it raised RecursionError, a 500)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _template_role(role: str) -> str:
    """OpenAI's ``developer`` role is the system role under another name."""
    return "system" if role == "developer" else role
