"""OpenAI's Responses API, served as a chat completion: the request translated to chat, the answer (whole or
streamed) written back as a response object and its event sequence.

Translated for every backend, so that the server's own figures, limits and store apply alike; what a chat request
cannot say is refused with a 400 naming the Responses parameter, never dropped.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from genai_server.apis.chat_events import Builder, Usage, build_whole, built_events
from genai_server.errors import APIError, InvalidRequest
from genai_server.protocol import ChatCompletionRequest

# Responses parameters a chat request names otherwise: an error about one blames the name the client sent.
CHAT_PARAMS = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
}
# Responses fields that change nothing here (include: there is nothing more to include; the rest are OpenAI's
# account-side options). Left out of the chat request.
_NO_EFFECT = frozenset({"include", "service_tier", "prompt_cache_key", "safety_identifier", "stream_options"})
# Responses features this server does not have: set to anything but their "off" value, a 400.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "max_tool_calls": (None,),
    "truncation": (None, "disabled"),
}
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (name, schema, strict at this level)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(min_length=1, max_length=64)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    """``text``: the output's format."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``. Fields of no Responses meaning (``top_k``, ``seed``, ``chat_template_kwargs``…) go
    on to the chat request, as they would to an engine's own Responses route."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: bool | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    reasoning: dict[str, Any] | None = None
    user: str | None = None

    @property
    def stored(self) -> bool:
        """``store`` defaults to true, as OpenAI's."""
        return self.store is not False


def new_response_id() -> str:
    """A response's id, ``resp_…`` as OpenAI writes it."""
    return f"resp_{uuid.uuid4().hex}"


def chat_request(req: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that answers ``req``: ``instructions`` first (never carried over from a previous response,
    as OpenAI says), then ``conversation``: the previous response's, and this request's input."""
    _check_supported(req)
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    messages += conversation
    if not messages:
        raise InvalidRequest("input must not be empty", param="input")
    body: dict[str, Any] = {
        key: value
        for key, value in (req.model_extra or {}).items()
        if key not in _NO_EFFECT and key not in _UNSUPPORTED
    }
    body.update(model=req.model, messages=messages, stream=req.stream, n=1)
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # the usage and our figures go on response.completed
    optional = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
        "tools": [_chat_tool(i, tool) for i, tool in enumerate(req.tools)] if req.tools else None,
        "tool_choice": _chat_tool_choice(req.tool_choice),
        "response_format": _chat_format(req.text.format if req.text else None),
        "reasoning_effort": (req.reasoning or {}).get("effort"),
    }
    body.update((key, value) for key, value in optional.items() if value is not None)
    if req.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=req.top_logprobs)
    return ChatCompletionRequest.model_validate(body)


def _check_supported(req: ResponsesRequest) -> None:
    extra = req.model_extra or {}
    for name, off in _UNSUPPORTED.items():
        if extra.get(name) not in off:
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def input_messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; items are messages, function calls (joined to the
    assistant message before them, as chat writes them) and their outputs. Reasoning items are dropped: templates
    drop earlier turns' reasoning too."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(i, item))
        elif kind == "function_call":
            _add_call(messages, i, item)
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", i), "content": output})
        elif kind != "reasoning":
            raise InvalidRequest(
                f"Input items of type {str(kind)[:64]!r} are not supported here",
                param=f"input.{i}.type",
                code="unsupported_parameter",
            )
    return messages


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(_MESSAGE_ROLES)}", param=f"input.{i}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=f"input.{i}.content")
    return {"role": role, "content": [_part(i, j, part) for j, part in enumerate(content)]}


def _part(i: int, j: int, part: Any) -> dict[str, Any]:
    """A content part as chat writes it: text parts as ``text``, an image as ``image_url`` (an engine behind a
    gateway may see images; the embedded one refuses them by name). Any other type passes as sent."""
    if not isinstance(part, dict):
        raise InvalidRequest("a content part must be an object", param=f"input.{i}.content.{j}")
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise InvalidRequest("a text part needs text", param=f"input.{i}.content.{j}.text")
        return {"type": "text", "text": text}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")}}
    return dict(part)


def _add_call(messages: list[dict[str, Any]], i: int, item: dict[str, Any]) -> None:
    call = {
        "id": _string(item, "call_id", i),
        "type": "function",
        "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _string(item: dict[str, Any], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string", param=f"input.{i}.{name}")
    return value


def _text(value: Any, param: str) -> str:
    """A function call's output: a string, or text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise InvalidRequest("output must be a string or a list of text parts", param=param)


def _chat_tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (flat) as chat's (nested); other types pass as sent, for an engine that knows
    them (the embedded one refuses them by name)."""
    if tool.get("type") != "function":
        return dict(tool)
    if not isinstance(tool.get("name"), str):
        raise InvalidRequest("a function tool needs a name", param=f"tools.{i}.name")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _chat_format(fmt: TextFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type != "json_schema":
        return fmt.model_dump(exclude_none=True, by_alias=True)
    if fmt.name is None:
        raise InvalidRequest("text.format.name is required for json_schema", param="text.format.name")
    schema = {"name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict, "description": fmt.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


# ---- the answer --------------------------------------------------------------------------------------------------


def skeleton(req: ResponsesRequest, response_id: str) -> dict[str, Any]:
    """The response object before any output: what was asked, as OpenAI echoes it."""
    fmt = req.text.format.model_dump(exclude_none=True, by_alias=True) if req.text and req.text.format else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
        "store": req.stored,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "metadata": req.metadata or {},
        **({"user": req.user} if req.user is not None else {}),
    }


class ResponseBuilder(Builder):
    """A response built from the chat answer's events, with the Responses events that say so as it grows: one
    output item open at a time (reasoning, a message, a function call), closed when another begins or at the end."""

    def __init__(self, response: dict[str, Any]) -> None:
        super().__init__()
        self.response = response
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the item deltas now go to
        self._calls: dict[int, dict[str, Any]] = {}  # a chat call's index -> its item

    # -- events

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        created = self._event("response.created", response=copy.deepcopy(self.response))
        return [created, self._event("response.in_progress", response=copy.deepcopy(self.response))]

    def text(self, text: str, logprobs: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
        """Answer text, and its tokens' log probabilities: into the open message (opened if need be)."""
        return [*self._open_item("message"), self._delta("response.output_text.delta", text, logprobs)]

    def reasoning(self, text: str) -> list[dict[str, Any]]:
        """Reasoning text: into the open reasoning item."""
        return [*self._open_item("reasoning"), self._delta("response.reasoning_text.delta", text)]

    def end(self) -> list[dict[str, Any]]:
        """The open item closed, then ``response.completed`` (``response.incomplete`` at the token limit), carrying
        the whole response with its usage and our figures."""
        events = self._close()
        incomplete = self.finish is not None and self.finish.reason == "length"
        self.response["status"] = "incomplete" if incomplete else "completed"
        if incomplete:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["completed_at"] = int(time.time())
        self._put_usage()
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*events, self._event(kind, response=self.response)]

    def fail(self, error: APIError) -> list[dict[str, Any]]:
        """An error after the stream began: the ``error`` event, then ``response.failed``."""
        self.response["status"] = "failed"
        self.response["error"] = {"code": _failure_code(error), "message": error.message}
        failed = self._event("error", code=error.code, message=error.message, param=error.param)
        return [failed, self._event("response.failed", response=self.response)]

    def assistant_message(self) -> dict[str, Any]:
        """The answer as a chat assistant message: what a later turn's history holds."""
        text = "".join(
            part["text"] for item in self.response["output"] if item["type"] == "message" for part in item["content"]
        )
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        calls = [item for item in self.response["output"] if item["type"] == "function_call"]
        if calls:
            message["tool_calls"] = [
                {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls
            ]
        return message

    # -- items

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        item: dict[str, Any]
        if kind == "message":
            item = {"id": _item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress"}
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": _item_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        item["content"] = []
        events.append(self._add(item))
        item["content"].append(part)
        events.append(self._item_event("response.content_part.added", content_index=0, part=copy.deepcopy(part)))
        return events

    def call(self, index: int, call_id: str, name: str) -> list[dict[str, Any]]:
        events = self._close()
        item = {
            "id": _item_id("fc"),
            "type": "function_call",
            "call_id": call_id or f"call_{uuid.uuid4().hex[:24]}",
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        self._calls[index] = item
        events.append(self._add(item))
        return events

    def arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        item = self._calls.get(index)
        if item is None:  # arguments before the call's name: nothing to attach them to
            return []
        item["arguments"] += text
        output_index = self.response["output"].index(item)
        return [
            self._event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=output_index, delta=text
            )
        ]

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.response["output"].append(item)
        self._open = item
        return self._event(
            "response.output_item.added", output_index=len(self.response["output"]) - 1, item=copy.deepcopy(item)
        )

    def _delta(self, kind: str, text: str, logprobs: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        assert self._open is not None
        part = self._open["content"][0]
        part["text"] += text
        event = self._item_event(kind, content_index=0, delta=text)
        if kind == "response.output_text.delta":
            part["logprobs"].extend(logprobs)
            event["logprobs"] = list(logprobs)
        return event

    def _close(self) -> list[dict[str, Any]]:
        """The open item's closing events."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = "incomplete" if self.finish is not None and self.finish.reason == "length" else "completed"
        events = []
        if item["type"] == "function_call":
            events.append(
                self._item_event(
                    "response.function_call_arguments.done", item=item, arguments=item["arguments"], name=item["name"]
                )
            )
        else:
            part = item["content"][0]
            if item["type"] == "message":
                done = self._item_event("response.output_text.done", item=item, content_index=0, text=part["text"])
                done["logprobs"] = part["logprobs"]
            else:
                done = self._item_event("response.reasoning_text.done", item=item, content_index=0, text=part["text"])
            events.append(done)
            events.append(self._item_event("response.content_part.done", item=item, content_index=0, part=part))
        index = self.response["output"].index(item)
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def _item_event(self, kind: str, item: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        item = item if item is not None else self._open
        assert item is not None
        return self._event(kind, item_id=item["id"], output_index=self.response["output"].index(item), **fields)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return event

    def _put_usage(self) -> None:
        usage = self.usage or Usage(0, 0)
        self.response["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
        self.response.update(usage.figures)


def _failure_code(error: APIError) -> str:
    """A failed response's ``error.code`` from the few OpenAI defines (the ``error`` event before it keeps ours)."""
    if error.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if error.status < 500 else "server_error"


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def whole_response(builder: ResponseBuilder, completion: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """The response object of a whole chat completion."""
    build_whole(builder, completion)
    return builder.response


async def response_events(
    builder: ResponseBuilder,
    chunks: AsyncGenerator[BaseModel | dict[str, Any], None],
    on_end: Callable[[ResponseBuilder], None],
) -> AsyncGenerator[dict[str, Any], None]:
    """The Responses event sequence of a streamed chat completion; ``on_end`` is told once it completed (the store
    keeps only a finished response). Closing it closes the chat stream, and so the generation."""
    async with aclosing(built_events(builder, chunks)) as events:
        async for event in events:
            yield event
    on_end(builder)


# ---- relayed as the engine wrote it ------------------------------------------------------------------------------

_LAST_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def last_event(item: BaseModel | dict[str, Any]) -> bool:
    """Whether an engine's own Responses event is the one with the usage (the stream's last)."""
    return isinstance(item, dict) and item.get("type") in _LAST_EVENTS


def with_figures(item: BaseModel | dict[str, Any], figures: dict[str, Any]) -> BaseModel | dict[str, Any]:
    """Our figures on an engine's response: beside its usage, on the response itself or the one its last event
    carries (where the openai SDK keeps them in ``model_extra``)."""
    if isinstance(item, dict):
        inner = item.get("response")
        holder: dict[str, Any] = inner if isinstance(inner, dict) else item
        holder.update((name, value.model_dump()) for name, value in figures.items())
    return item


def relayed_failure(error: APIError) -> list[dict[str, Any]]:
    """An error after an engine's own stream began: the ``error`` event (its place in the sequence unknown here)."""
    return [{"type": "error", "code": error.code, "message": error.message, "param": error.param, "sequence_number": 0}]
