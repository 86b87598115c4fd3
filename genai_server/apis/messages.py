"""Anthropic's Messages API, served as a chat completion: the request translated to chat, the answer (whole or
streamed) written back as a message and its event sequence, errors in Anthropic's envelope.

Translated for every backend, as the Responses API is; what chat cannot say is refused with a 400 naming the
Messages parameter, never dropped.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any, NoReturn

import orjson
from pydantic import BaseModel, ConfigDict, Field

from genai_server.apis.chat_events import Builder, Usage, build_whole
from genai_server.errors import APIError, InvalidRequest
from genai_server.protocol import ChatCompletionRequest

# Messages parameters a chat request names otherwise: an error about one blames the name the client sent.
CHAT_PARAMS = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "response_format": "output_config.format",
}
# The error types Anthropic's envelope names, by HTTP status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# Fields of the Messages API that change nothing here: left out of the chat request.
_NO_EFFECT = frozenset(
    {
        "service_tier",
        "container",
        "context_management",
        "cache_control",
        "inference_geo",
        "speed",
        "user_profile_id",
        "workspace_id",
        "diagnostics",
    }
)
# Anthropic features this server does not have.
_UNSUPPORTED = ("mcp_servers",)


class MessagesRequest(BaseModel):
    """``POST /v1/messages``. Fields of no Messages meaning (``seed``, ``chat_template_kwargs``…) go on to the chat
    request."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: the prompt of a Messages request, without generating."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def error_body(error: APIError) -> dict[str, Any]:
    """Anthropic's error envelope; its ``type`` from the HTTP status (``api_error`` for any other 5xx)."""
    kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def chat_request(req: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that answers ``req`` (a count is the same prompt, with one token asked for)."""
    extra = req.model_extra or {}
    for name in _UNSUPPORTED:
        if extra.get(name):
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    body: dict[str, Any] = {k: v for k, v in extra.items() if k not in _NO_EFFECT}
    body.update(model=req.model, messages=_system(req.system) + _messages(req.messages), n=1)
    if req.tools:
        body["tools"] = [_chat_tool(i, tool) for i, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        body.update(_chat_tool_choice(req.tool_choice))
    if req.thinking is not None:
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be an object", param="chat_template_kwargs")
        body["chat_template_kwargs"] = {**kwargs, "enable_thinking": req.thinking.get("type") == "enabled"}
    if isinstance(req, MessagesRequest):
        _sampling(req, body)
        _output(req.output_config or {}, body)
    else:
        body["max_completion_tokens"] = 1
    return ChatCompletionRequest.model_validate(body)


def _sampling(req: MessagesRequest, body: dict[str, Any]) -> None:
    body.update(max_completion_tokens=req.max_tokens, stream=req.stream)
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # the usage and our figures go on message_delta
    optional = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "stop": req.stop_sequences}
    body.update((key, value) for key, value in optional.items() if value is not None)
    user = (req.metadata or {}).get("user_id")
    if isinstance(user, str):
        body["user"] = user


def _output(config: dict[str, Any], body: dict[str, Any]) -> None:
    """``output_config``: ``format`` (a JSON schema the answer follows) and ``effort`` (for a reasoning engine)."""
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest(
                "output_config.format must be {'type': 'json_schema', 'schema': {...}}", param="output_config.format"
            )
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if config.get("effort") is not None:
        body["reasoning_effort"] = config["effort"]


def _system(system: str | list[Any] | None) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    texts = [block.get("text") if isinstance(block, dict) else None for block in system]
    if not all(isinstance(t, str) and block.get("type") == "text" for t, block in zip(texts, system, strict=True)):
        raise InvalidRequest("system blocks must be text blocks", param="system")
    return [{"role": "system", "content": "\n\n".join(t for t in texts if isinstance(t, str))}]


def _messages(given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's turns as chat messages: a user turn's tool results become tool messages (before its text), an
    assistant turn's tool uses its tool calls. Earlier thinking is dropped, as templates drop earlier reasoning."""
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(given):
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise InvalidRequest("role must be 'user', 'assistant' or 'system'", param=f"messages.{i}.role")
        content = message.get("content")
        if role == "system":  # instructions mid-conversation: text only
            messages.extend(_system(content if isinstance(content, str | list) else None) or [_no_content(i)])
        elif isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            messages.extend(_blocks(i, role, content))
        else:
            raise InvalidRequest("content must be a string or a list of blocks", param=f"messages.{i}.content")
    return messages


def _no_content(i: int) -> NoReturn:
    raise InvalidRequest("content must be a string or a list of blocks", param=f"messages.{i}.content")


def _blocks(i: int, role: str, blocks: list[Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        param = f"messages.{i}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image(block, param))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_call(block, param))
        elif kind == "tool_result" and role == "user":
            results.append(_result(block, param))
        elif kind not in ("thinking", "redacted_thinking"):
            raise InvalidRequest(
                f"A {role} content block of type {str(kind)[:64]!r} is not supported here",
                param=f"{param}.type",
                code="unsupported_parameter",
            )
    out = list(results)
    if calls:
        out.append({"role": "assistant", "content": parts or None, "tool_calls": calls})
    elif parts or not results:
        out.append({"role": role, "content": parts})
    return out


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    """An image as chat's ``image_url`` part (an engine behind a gateway may see it; the embedded one refuses it)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest("an image needs a base64 or url source", param=f"{param}.source")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise InvalidRequest("an image needs a base64 or url source", param=f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _call(block: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise InvalidRequest("a tool_use block needs an id and a name", param=param)
    arguments = json.dumps(block.get("input") if isinstance(block.get("input"), dict) else {})
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def _result(block: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(block.get("tool_use_id"), str):
        raise InvalidRequest("a tool_result block needs a tool_use_id", param=f"{param}.tool_use_id")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = [b.get("text") for b in content if isinstance(b, dict)]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("tool_result content must be text", param=f"{param}.content")
        content = "".join(t for t in texts if isinstance(t, str))
    if not isinstance(content, str):
        raise InvalidRequest("tool_result content must be a string or text blocks", param=f"{param}.content")
    if block.get("is_error") is True:
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _chat_tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    """A client tool (name, description, input_schema) as a chat function; Anthropic's server tools (typed, such as
    web search) are not this server's to run."""
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(
            f"Tools of type {str(tool.get('type'))[:64]!r} are not supported; give client tools (name, input_schema)",
            param=f"tools.{i}.type",
            code="unsupported_parameter",
        )
    if not isinstance(tool.get("name"), str):
        raise InvalidRequest("a tool needs a name", param=f"tools.{i}.name")
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    kinds: dict[str, Any] = {"auto": "auto", "any": "required", "none": "none"}
    kind = choice.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest("tool_choice type must be auto, any, tool or none", param="tool_choice.type")
    if kind == "tool":
        picked: Any = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in kinds:
        picked = kinds[kind]
    else:
        raise InvalidRequest("tool_choice type must be auto, any, tool or none", param="tool_choice.type")
    body: dict[str, Any] = {"tool_choice": picked}
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False
    return body


# ---- the answer --------------------------------------------------------------------------------------------------


class MessageBuilder(Builder):
    """A message built from the chat answer's events, with the Messages events that say so as it grows: one content
    block open at a time (thinking, text, a tool use), stopped when another begins or at the end."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        self._open: dict[str, Any] | None = None
        self._arguments: dict[int, str] = {}  # a tool use's index -> its arguments as the model wrote them
        self._calls: dict[int, dict[str, Any]] = {}

    def start(self) -> list[dict[str, Any]]:
        """``message_start`` (its usage is known at the end, on ``message_delta``), then a ``ping``."""
        start = {"type": "message_start", "message": copy.deepcopy(self.message)}
        return [start, {"type": "ping"}]

    def text(self, text: str, logprobs: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
        """Answer text: into the open text block (opened if need be); Messages has no log probabilities."""
        return [*self._open_block("text"), self._delta({"type": "text_delta", "text": text}, "text", text)]

    def reasoning(self, text: str) -> list[dict[str, Any]]:
        """Reasoning text: into the open thinking block."""
        delta = {"type": "thinking_delta", "thinking": text}
        return [*self._open_block("thinking"), self._delta(delta, "thinking", text)]

    def end(self) -> list[dict[str, Any]]:
        """The open block stopped, then ``message_delta`` (stop reason, usage, our figures) and ``message_stop``."""
        events = self._close()
        for index, block in self._calls.items():  # every call's input whole, arguments that came late included
            block["input"] = _object(self._arguments[index])
        reason = self.finish.reason if self.finish is not None else "stop"
        stop_sequence = self.finish.stop_sequence if self.finish is not None else None
        self.message["stop_reason"] = "stop_sequence" if stop_sequence else _STOP_REASONS.get(reason, "end_turn")
        self.message["stop_sequence"] = stop_sequence
        usage = self.usage or Usage(0, 0)
        cached = usage.cached_tokens or 0
        # Anthropic counts input tokens read from the cache apart from the rest.
        self.message["usage"] = {
            "input_tokens": usage.prompt_tokens - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": usage.completion_tokens,
        }
        self.message.update(usage.figures)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.message["stop_reason"], "stop_sequence": stop_sequence},
            "usage": self.message["usage"],
            **usage.figures,
        }
        return [*events, delta, {"type": "message_stop"}]

    def _open_block(self, kind: str) -> list[dict[str, Any]]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        block: dict[str, Any] = {"type": kind, kind: ""}
        if kind == "thinking":
            block["signature"] = ""
        return [*events, self._add(block)]

    def call(self, index: int, call_id: str, name: str) -> list[dict[str, Any]]:
        events = self._close()
        block = {"type": "tool_use", "id": call_id or f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": {}}
        self._calls[index] = block
        self._arguments[index] = ""
        return [*events, self._add(block)]

    def arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        block = self._calls.get(index)
        if block is None:
            return []
        self._arguments[index] += text
        delta = {"type": "input_json_delta", "partial_json": text}
        return [{"type": "content_block_delta", "index": self.message["content"].index(block), "delta": delta}]

    def _add(self, block: dict[str, Any]) -> dict[str, Any]:
        self.message["content"].append(block)
        self._open = block
        shown = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        return {"type": "content_block_start", "index": len(self.message["content"]) - 1, "content_block": shown}

    def _delta(self, delta: dict[str, Any], field: str, text: str) -> dict[str, Any]:
        assert self._open is not None
        self._open[field] += text
        return {"type": "content_block_delta", "index": len(self.message["content"]) - 1, "delta": delta}

    def _close(self) -> list[dict[str, Any]]:
        block, self._open = self._open, None
        if block is None:
            return []
        return [{"type": "content_block_stop", "index": self.message["content"].index(block)}]


def _object(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object ``input`` is; arguments that are not a JSON object (cut by the token limit)
    are kept whole under ``_raw`` rather than lost."""
    try:  # orjson: a value the answer's own serializer refuses (an integer beyond 64 bits) is refused here
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def whole_message(builder: MessageBuilder, completion: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """The message of a whole chat completion."""
    build_whole(builder, completion)
    return builder.message


def stream_error(error: APIError) -> list[dict[str, Any]]:
    """An error after the stream began: Anthropic's ``error`` event."""
    return [error_body(error)]


def last_event(item: BaseModel | dict[str, Any]) -> bool:
    """Whether an engine's own Messages event is the one with the final usage (``message_delta``)."""
    return isinstance(item, dict) and item.get("type") == "message_delta"


def with_figures(item: BaseModel | dict[str, Any], figures: dict[str, Any]) -> BaseModel | dict[str, Any]:
    """Our figures on an engine's message or its ``message_delta``, beside the usage."""
    if isinstance(item, dict):
        item.update((name, value.model_dump()) for name, value in figures.items())
    return item
