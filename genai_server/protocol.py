"""The OpenAI wire format: request and response models for chat, completions and models.

Requests allow unknown extra fields (clients send many; the OpenAI API ignores
what it does not know) and the server logs them at debug. Parameters the engine
cannot honour are rejected with a 400 naming the parameter, never silently dropped.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genai_server.errors import InvalidRequest

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "tool_calls"]

# Parameters the OpenAI API defines that this engine cannot honour, with the
# values that mean "off" (and so are accepted). Anything else is a 400.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}


# What the engine's C++ side can hold: sampling values are float32, counts and top_k int32. The OpenAI API
# defines seed as a 64-bit integer; the server folds it into the engine's range itself (``engine_seed``).
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_none(value: object) -> bool:
    return value is None


def as_float32(value: float) -> float:
    """``value`` as the engine sees it (a C float); an overflow is a ``ValueError``."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        raise ValueError(f"{value} is out of range for a 32-bit float") from None


def engine_seed(seed: int) -> int:
    """A 64-bit OpenAI seed folded into the engine's non-negative int32 range (-1 would mean "random")."""
    return seed % (INT32_MAX + 1)


class RequestMetrics(BaseModel):
    """What one request cost, as the client receives it (``metrics`` in the body, the last stream chunk)."""

    queue_time_ms: float | None = None
    time_to_first_token_ms: float | None = None
    time_per_output_token_ms: float | None = None
    mean_itl_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p95_ms: float | None = None
    generation_time_ms: float | None = None
    e2e_latency_ms: float | None = None
    tokens_per_second: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int | None = None
    completion_tokens: int = 0
    peak_rss_mb: float | None = None
    gpu_memory_used_start_mb: float | None = None
    gpu_memory_peak_mb: float | None = None
    gpu_memory_delta_mb: float | None = None
    gpu_process_memory_mb: float | None = None
    backend_reported: dict[str, object] | None = None


class Performance(RequestMetrics):
    """The same figures under the names the original design used."""

    latency_ms: float | None = None
    peak_memory_mb: float | None = None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` is OpenAI's; an engine's own (vLLM's ``continuous_usage_stats``) pass
    through a gateway to it, and the embedded engine ignores them, as it does unknown top-level fields."""

    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the output must follow."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


# The types OpenAI defines; an engine behind a gateway may know others (SGLang's, vLLM's ``regex``), which pass
# through to it with their fields, and the embedded engine refuses by name.
OPENAI_FORMATS = ("text", "json_object", "json_schema")


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON following a schema (Structured Outputs)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(min_length=1, max_length=64)
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class SamplingRequest(BaseModel):
    """Fields shared by chat and completion requests.

    Strict: ``"stream": "yes"`` or ``"max_tokens": "10"`` are type errors, as in the OpenAI API.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    # vLLM's prefix-cache salt: a request continues only a kept conversation of the same salt (and API key).
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="vLLM/llama.cpp extension; 0 or -1 = off")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, description="vLLM extension; 1 = off")
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX, description="vLLM extension: no end before this many")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("repetition_penalty")
    @classmethod
    def _check_penalty(cls, value: float | None) -> float | None:
        if value is not None and as_float32(value) == 0.0:
            raise ValueError("repetition_penalty must be greater than 0 (as a 32-bit float)")
        return value

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, value: float | None) -> float | None:
        # The engine refuses a sampled turn whose top_p is 0 as a float32, e.g. 1e-50.
        if value is not None and as_float32(value) == 0.0:
            raise ValueError("top_p must be greater than 0 (as a 32-bit float)")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.min_tokens and self.limit is not None and self.min_tokens > self.limit:
            raise InvalidRequest(f"min_tokens must not be greater than {self.limit_param}", param="min_tokens")
        if self.model_extra:
            log.debug("ignoring unknown request fields", extra={"fields": {"ignored": sorted(self.model_extra)}})
        return self

    @property
    def stop_list(self) -> list[str]:
        """Stop sequences as a list (the validator normalises a string to a list)."""
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streaming client asked for the final usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def limit(self) -> int | None:
        """The most tokens to generate per choice, if the client set one."""
        return self.max_tokens

    @property
    def limit_param(self) -> str:
        """The parameter ``limit`` came from, as the client named it: what an error about it blames."""
        return "max_tokens"

    @property
    def top_logprobs_asked(self) -> int | None:
        """How many alternatives to report with each token's log probability; None: no logprobs."""
        return None


class ContentPart(BaseModel):
    """A part of a message's content array: ``text`` for every backend; images, audio and the rest are relayed to
    an upstream engine that may take them, and refused by those that cannot (``check_plain_messages``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """A function call: in an assistant message of the history, and in a response's ``tool_calls``."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call the assistant made earlier in the conversation."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    """``tools[].function``: what the model may call, with its parameters' JSON schema."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of ``tools``. Types other than ``function`` are relayed to an upstream that may know them."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    function: FunctionDefinition | None = None


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function to call."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    function: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One message of the conversation, in every shape the OpenAI API allows (tool calls and their results too);
    what a backend cannot take, it refuses."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts are joined as the OpenAI API does)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content or [])


def check_supported(req: SamplingRequest) -> None:
    """For a backend that generates itself (not a relay): a parameter it cannot honour is a 400 naming it, never
    silently ignored."""
    extra = req.model_extra or {}
    for name, allowed in _UNSUPPORTED.items():
        if name in extra and extra[name] not in allowed:
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def check_plain_messages(messages: list[ChatMessage]) -> None:
    """For a backend that takes text conversations only: system, user and assistant turns of text."""
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise InvalidRequest(f"Messages of role '{message.role}' are not supported", param=f"messages.{i}.role")
        if message.tool_calls:
            raise InvalidRequest("Tool calls are not supported", param=f"messages.{i}.tool_calls")
    check_text_messages(messages)


def check_text_messages(messages: list[ChatMessage]) -> None:
    """Every message is text (parts of type ``text``); only an assistant message that calls tools may have none."""
    for i, message in enumerate(messages):
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequest("A message needs content", param=f"messages.{i}.content", code="missing_parameter")
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text":
                raise InvalidRequest(
                    f"Content parts of type '{part.type}' are not supported", param=f"messages.{i}.content.{j}.type"
                )
            if part.text is None:
                raise InvalidRequest(
                    "A text part needs text", param=f"messages.{i}.content.{j}.text", code="missing_parameter"
                )


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise InvalidRequest("tool_choice is only allowed when tools are specified", param="tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("logprobs must be true when top_logprobs is set", param="top_logprobs")
        return self

    @property
    def top_logprobs_asked(self) -> int | None:
        """``logprobs: true`` asks for them, ``top_logprobs`` for that many alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def limit(self) -> int | None:
        """``max_completion_tokens`` is the newer name; it wins when both are sent."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def limit_param(self) -> str:
        """``max_completion_tokens`` when the client sent it (it wins), else ``max_tokens``."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (OpenAI allows 5, vLLM 20)")

    @property
    def top_logprobs_asked(self) -> int | None:
        """``logprobs: k`` asks for each token's log probability and k alternatives (0 is the token alone)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and len(value) > 16 and not isinstance(value[0], int):
            raise ValueError("at most 16 prompts per request")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings, or token-id lists."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


# ---- responses -------------------------------------------------------------------------


def json_bytes(payload: BaseModel | dict[str, Any]) -> bytes:
    """A response or chunk on the wire: our models through pydantic's serializer, relayed upstream JSON through
    orjson (it runs once per relayed chunk; ~6x faster than the json module, measured)."""
    if isinstance(payload, dict):
        return orjson.dumps(payload)
    return payload.model_dump_json().encode()


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``chatcmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, as OpenAI's ``created``."""
    return int(time.time())


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: how many were served from the prefix cache."""

    cached_tokens: int


class Usage(BaseModel):
    """Token counts from the model's own tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=_is_none)


class TopLogprob(BaseModel):
    """One token and its log probability (``bytes``: its UTF-8 bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    """A generated token's log probability, with the most likely tokens at its step."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token."""

    content: list[TokenLogprobOut] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """A text completion choice's ``logprobs``, in the legacy parallel-lists shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ToolCallOut(BaseModel):
    """A call the model made, in a whole response."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The generated message of a chat choice: text, tool calls, or both (``content`` is null when there is only
    calls, as OpenAI writes it)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_is_none)
    # A reasoning model's thinking, under the name vLLM and DeepSeek gave it and the one vLLM and Ollama use now.
    reasoning_content: str | None = Field(None, exclude_if=_is_none)
    reasoning: str | None = Field(None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The non-streaming chat response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: RequestMetrics | None = None
    performance: Performance | None = None


class FunctionDelta(BaseModel):
    """A piece of a streamed call: its name in the first piece, then its arguments."""

    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str


class ToolCallDelta(BaseModel):
    """A streamed call's piece: the first carries its id, type and name, the next ones its arguments."""

    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: FunctionDelta


class ChatDelta(BaseModel):
    """What one chunk adds to a chat choice (absent fields are left out, as OpenAI does)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_is_none)
    reasoning_content: str | None = Field(None, exclude_if=_is_none)  # as on the message, under both names
    reasoning: str | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    """One choice's piece of a chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)
    metrics: RequestMetrics | None = Field(None, exclude_if=_is_none)
    performance: Performance | None = Field(None, exclude_if=_is_none)


class CompletionChoice(BaseModel):
    """One choice of a text completion (also the streamed piece)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """The text completion response, and each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)
    metrics: RequestMetrics | None = Field(None, exclude_if=_is_none)
    performance: Performance | None = Field(None, exclude_if=_is_none)


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genai_server"
    max_model_len: int | None = Field(
        None, exclude_if=_is_none, description="tokens per sequence, prompt included (vLLM's field)"
    )
    context_length: int | None = Field(
        None, exclude_if=_is_none, description="the same, under the name other servers and clients read"
    )
    status: Literal["loaded", "loading", "unloaded", "failed"] | None = Field(
        None, exclude_if=_is_none, description="a model loaded on demand (MODELS_DIR): whether it is in memory now"
    )


class ModelAction(BaseModel):
    """``POST /models/load`` and ``/models/unload``: the model (llama-server's router shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: relayed as sent to an engine that serves embeddings."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    user: str | None = None


# ---- tokenizing ----------------------------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: vLLM's shape (``prompt``, or ``messages`` through the chat template) and llama-server's
    (``content``, ``add_special``, ``with_pieces``). Without ``model``, the first model's tokenizer."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, min_length=1)
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_special_tokens: bool | None = None
    add_special: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [name for name in ("prompt", "content", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidRequest("Give exactly one of prompt, content (a text) or messages", param="prompt")
        return self

    @property
    def text(self) -> str | None:
        """The text to tokenise (``prompt`` or ``content``); None when it is ``messages``."""
        return self.prompt if self.prompt is not None else self.content

    @property
    def special_tokens(self) -> bool:
        """Whether the tokenizer's special tokens (BOS) are added to a text: vLLM's and llama-server's default for
        a prompt, yes; a chat template writes its own."""
        asked = self.add_special_tokens if self.add_special_tokens is not None else self.add_special
        return asked if asked is not None else self.messages is None

    @property
    def pieces(self) -> bool:
        """Whether each token's text is asked for too."""
        return self.return_token_strs or self.with_pieces


class TokenizeResponse(BaseModel):
    """vLLM's answer (``count``, ``max_model_len``, ``tokens``, ``token_strs``), which llama-server's clients read
    too (``tokens``)."""

    count: int
    max_model_len: int | None = None
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_is_none)


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, min_length=1)
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    """The text, under vLLM's name (``prompt``) and llama-server's (``content``)."""

    prompt: str
    content: str
