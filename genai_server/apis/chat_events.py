"""A chat answer, whole or streamed, ours or an upstream's JSON, read as the few events another API is written
from: text, reasoning, a call begun, a call's arguments, the finish, and the usage with our figures.

Only the first choice is read: the translated APIs ask for one.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Text:
    """Answer text, and its tokens' log probabilities when they were asked for (each as chat writes one)."""

    text: str
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Reasoning:
    """Reasoning text (``reasoning_content``, or ``reasoning`` as vLLM and Ollama now name it)."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A tool call begun: its position among the calls, its id and the function's name."""

    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """A piece of a call's arguments (JSON text)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    """Why the answer ended, as chat says it (``stop``, ``length``, ``tool_calls``), and the stop string that ended
    it when the engine says which (vLLM's ``stop_reason``)."""

    reason: str
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Usage:
    """The answer's token counts, and our figures (``metrics``, ``performance``) when the serving layer put them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    reasoning_tokens: int = 0  # where the engine says (``completion_tokens_details``)


ChatEvent = Text | Reasoning | CallStart | CallArguments | Finish | Usage

_FIGURES = ("metrics", "performance")


class Builder(ABC):
    """An API's answer built from a chat answer's events, saying as it grows what that API's stream says: each
    piece handed to the method for its kind; the finish and the usage kept for the end."""

    def __init__(self) -> None:
        self.finish: Finish | None = None
        self.usage: Usage | None = None

    @abstractmethod
    def start(self) -> list[dict[str, Any]]:
        """The events before any output."""

    def feed(self, event: ChatEvent) -> list[dict[str, Any]]:
        """The events one piece of the chat answer makes."""
        match event:
            case Text(text, logprobs):
                return self.text(text, logprobs)
            case Reasoning(text):
                return self.reasoning(text)
            case CallStart(index, call_id, name):
                return self.call(index, call_id, name)
            case CallArguments(index, text):
                return self.arguments(index, text)
            case Finish():
                self.finish = event
            case Usage():
                self.usage = event
        return []

    @abstractmethod
    def text(self, text: str, logprobs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
        """Answer text, and its tokens' log probabilities if asked for."""

    @abstractmethod
    def reasoning(self, text: str) -> list[dict[str, Any]]:
        """Reasoning text."""

    @abstractmethod
    def call(self, index: int, call_id: str, name: str) -> list[dict[str, Any]]:
        """A tool call begun."""

    @abstractmethod
    def arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        """A piece of a call's arguments."""

    @abstractmethod
    def end(self) -> list[dict[str, Any]]:
        """The events after the last piece."""


def build_whole(builder: Builder, completion: BaseModel | dict[str, Any]) -> None:
    """Feed a whole chat completion to ``builder`` (its events are not needed: the client wants the answer)."""
    for event in whole_events(completion):
        builder.feed(event)
    builder.end()


async def built_events(
    builder: Builder, chunks: AsyncGenerator[BaseModel | dict[str, Any], None]
) -> AsyncGenerator[dict[str, Any], None]:
    """The events ``builder`` makes of a streamed chat completion; closing it closes the chat stream, and so the
    generation."""
    async with aclosing(chunks):  # entered first: a client gone at the first event still closes the generation
        for event in builder.start():
            yield event
        async for chunk in chunks:
            for piece in chunk_events(chunk):
                for event in builder.feed(piece):
                    yield event
    for event in builder.end():
        yield event


def as_dict(answer: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Our model or relayed JSON, as JSON."""
    return answer if isinstance(answer, dict) else answer.model_dump(mode="json")


def chunk_events(chunk: BaseModel | dict[str, Any]) -> list[ChatEvent]:
    """What one streamed chat chunk adds."""
    data = as_dict(chunk)
    events: list[ChatEvent] = []
    for choice in _first_choice(data):
        delta = choice.get("delta") or {}
        events.extend(_reasoning(delta))
        if isinstance(delta.get("content"), str) and delta["content"]:
            events.append(Text(delta["content"], _logprobs(choice)))
        for position, call in enumerate(delta.get("tool_calls") or []):
            events.extend(_call_pieces(call, position))
        events.extend(_finish(choice))
    events.extend(_usage(data))
    return events


def whole_events(completion: BaseModel | dict[str, Any]) -> list[ChatEvent]:
    """A whole chat completion as the events its stream would have carried."""
    data = as_dict(completion)
    events: list[ChatEvent] = []
    for choice in _first_choice(data):
        message = choice.get("message") or {}
        events.extend(_reasoning(message))
        if isinstance(message.get("content"), str) and message["content"]:
            events.append(Text(message["content"], _logprobs(choice)))
        for position, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            events.append(CallStart(position, str(call.get("id") or ""), str(function.get("name") or "")))
            events.append(CallArguments(position, str(function.get("arguments") or "")))
        events.extend(_finish(choice))
    events.extend(_usage(data))
    return events


def _first_choice(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in data.get("choices") or [] if isinstance(c, dict) and c.get("index", 0) == 0]


def _logprobs(choice: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """A choice's tokens' log probabilities, each with its alternatives, ``bytes`` always a list."""
    given = choice.get("logprobs")
    items = given.get("content") if isinstance(given, dict) else None
    return tuple(
        {
            **_logprob(item),
            "top_logprobs": [_logprob(top) for top in item.get("top_logprobs") or [] if isinstance(top, dict)],
        }
        for item in items or []
        if isinstance(item, dict)
    )


def _logprob(item: dict[str, Any]) -> dict[str, Any]:
    """One token's entry: its text, log probability and bytes."""
    return {"token": str(item.get("token", "")), "logprob": item.get("logprob", 0.0), "bytes": item.get("bytes") or []}


def _reasoning(part: dict[str, Any]) -> list[ChatEvent]:
    """Reasoning under either name; an engine that sends both sends the same text twice, read once."""
    text = part.get("reasoning_content") or part.get("reasoning")
    return [Reasoning(text)] if isinstance(text, str) and text else []


def _call_pieces(call: dict[str, Any], position: int) -> list[ChatEvent]:
    """A streamed call's piece: its first carries the name (and id), the rest arguments."""
    index = call.get("index", position)
    function = call.get("function") or {}
    pieces: list[ChatEvent] = []
    if function.get("name"):
        pieces.append(CallStart(index, str(call.get("id") or ""), str(function["name"])))
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        pieces.append(CallArguments(index, arguments))
    elif isinstance(arguments, dict):  # an engine that sends them as an object (Ollama's native shape)
        pieces.append(CallArguments(index, json.dumps(arguments)))
    return pieces


def _finish(choice: dict[str, Any]) -> list[ChatEvent]:
    reason = choice.get("finish_reason")
    if not isinstance(reason, str) or not reason:
        return []
    matched = choice.get("stop_reason")
    return [Finish(reason, matched if isinstance(matched, str) else None)]


def _usage(data: dict[str, Any]) -> list[ChatEvent]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return []
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    generated = usage.get("completion_tokens_details") or {}
    reasoning = generated.get("reasoning_tokens") if isinstance(generated, dict) else None
    figures = {name: data[name] for name in _FIGURES if isinstance(data.get(name), dict)}
    return [
        Usage(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            cached if isinstance(cached, int) else None,
            figures,
            reasoning if isinstance(reasoning, int) and reasoning >= 0 else 0,
        )
    ]
