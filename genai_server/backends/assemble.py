"""A whole response assembled from a relayed stream, for a client that asked for one JSON answer.

The upstream is always asked to stream (so this server can time it); a non-streaming client must still get the
object the upstream would have returned: text joined, tool-call deltas merged by index (the id, type and name
come once, the arguments in pieces), logprobs concatenated, reasoning (``reasoning_content``, vLLM's and
llama.cpp's name, or ``reasoning``) and ``refusal`` kept, and any other field a choice carried (vLLM's
``stop_reason``) kept as last sent. Upstream bytes are checked where they are read, and the whole is bounded in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from genai_server.errors import UpstreamError
from genai_server.protocol import now

# Refused past this many bytes of choices in all (text, tool calls, logprobs, every field a choice carries, as the
# upstream sent them): an upstream that never stops must not grow it until the OOM killer comes. Counting only text
# let logprob lists and tool calls of distinct indices grow one answer by a gigabyte. A request that asks for
# logprobs may need more: ``assembly_budget``.
MAX_ASSEMBLED_BYTES = 16 * 1024 * 1024
# What one token may take in a chunk with its logprob entries: the entry itself and each alternative (~70 bytes
# each as vLLM writes them), generously.
_BYTES_PER_LOGPROB_ENTRY = 256


def assembly_budget(choices: int, max_tokens: int, top_logprobs: int | None) -> int:
    """The bytes one answer may hold: 16 MiB, or what its tokens' logprob entries can take if more (``n`` x
    ``max_tokens`` x (``top_logprobs`` + 1) entries): a legitimate answer with 20 alternatives per token is
    ~1.5 KB a token."""
    if top_logprobs is None:
        return MAX_ASSEMBLED_BYTES
    return max(MAX_ASSEMBLED_BYTES, choices * max_tokens * (top_logprobs + 1) * _BYTES_PER_LOGPROB_ENTRY)


# Delta fields joined as text; everything else a choice carries is kept as last sent.
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
_CHOICE_FIELDS = frozenset({"index", "delta", "text", "finish_reason", "logprobs"})


@dataclass
class _Choice:
    """One choice as it accumulates."""

    texts: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Assembler:
    """Feed it the relayed chunks in order; ``response`` is the whole answer."""

    def __init__(self, kind: str, budget: int = MAX_ASSEMBLED_BYTES) -> None:
        self.kind = kind  # "chat.completion" or "text_completion"
        self._budget = budget
        self._choices: dict[int, _Choice] = {}
        self._head: dict[str, Any] = {}
        self._size = 0

    def add(self, chunk: dict[str, Any]) -> None:
        """One relayed chunk (already shape-checked for its text, index and usage)."""
        if not self._head:
            self._head = {k: v for k, v in chunk.items() if k not in ("choices", "object")}
        for name in ("usage", "system_fingerprint"):
            if chunk.get(name) is not None:
                self._head[name] = chunk[name]
        for item in chunk.get("choices", []):
            self._count(len(orjson.dumps(item)))
            self._add_choice(self._choices.setdefault(int(item.get("index", 0)), _Choice()), item)

    def response(self) -> dict[str, Any]:
        """The whole answer, as the upstream would have returned it unstreamed."""
        head = self._head
        return {
            "id": head.get("id", ""),
            "object": self.kind,
            "created": head.get("created", now()),
            "model": head.get("model"),
            **({"system_fingerprint": head["system_fingerprint"]} if "system_fingerprint" in head else {}),
            "choices": [self._finished(i, c) for i, c in sorted(self._choices.items())],
            "usage": head.get("usage"),  # our figures go beside it in the serving layer
        }

    # ---- one choice ----------------------------------------------------------------------------------

    def _add_choice(self, choice: _Choice, item: dict[str, Any]) -> None:
        delta = item.get("delta") if self.kind == "chat.completion" else {"content": item.get("text")}
        delta = delta or {}
        for name in _TEXT_FIELDS:
            piece = delta.get(name)
            if piece is not None:
                choice.texts.setdefault(name, []).append(_string(piece))
        for call in _list(delta.get("tool_calls")):
            self._merge_call(choice, call)
        if item.get("logprobs") is not None:
            choice.logprobs = _merge_logprobs(choice.logprobs, item["logprobs"])
        choice.finish_reason = item.get("finish_reason") or choice.finish_reason
        choice.extra.update({k: v for k, v in item.items() if k not in _CHOICE_FIELDS})

    def _merge_call(self, choice: _Choice, call: Any) -> None:
        """A streamed tool call: its first delta names it, the rest add to its arguments."""
        if not isinstance(call, dict) or type(call.get("index", 0)) is not int:
            raise _malformed()
        merged = choice.tool_calls.setdefault(call.get("index", 0), {"function": {"arguments": ""}})
        for name in ("id", "type"):
            if call.get(name) is not None:
                merged[name] = _string(call[name])
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise _malformed()
        if function.get("name") is not None:
            merged["function"]["name"] = _string(function["name"])
        merged["function"]["arguments"] += _string(function.get("arguments") or "")

    def _finished(self, index: int, choice: _Choice) -> dict[str, Any]:
        texts = {name: "".join(parts) for name, parts in choice.texts.items()}
        common = {"index": index, **choice.extra, "logprobs": choice.logprobs, "finish_reason": choice.finish_reason}
        if self.kind != "chat.completion":
            return {**common, "text": texts.get("content", "")}
        calls = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": texts.get("content", None if calls else ""),
            "refusal": texts.get("refusal"),
        }
        message.update({name: texts[name] for name in ("reasoning_content", "reasoning") if name in texts})
        if calls:
            message["tool_calls"] = [{"type": "function", **call} for call in calls]
        return {"index": index, "message": message, **{k: v for k, v in common.items() if k != "index"}}

    def _count(self, size: int) -> None:
        self._size += size
        if self._size > self._budget:
            raise UpstreamError("The upstream engine's answer is too large to assemble")


def _merge_logprobs(so_far: dict[str, Any] | None, new: Any) -> dict[str, Any]:
    """Chat logprobs (``content``/``refusal`` lists) and completion logprobs (``tokens``, ``token_logprobs``,
    ``top_logprobs``, ``text_offset`` lists) are both concatenated list by list, in place (copying the lists at
    every chunk made a long answer quadratic)."""
    if not isinstance(new, dict):
        raise _malformed()
    merged = so_far if so_far is not None else {}
    for name, value in new.items():
        if isinstance(value, list):
            kept = merged.setdefault(name, [])
            if not isinstance(kept, list):
                raise _malformed()
            kept.extend(value)
        elif name not in merged:
            merged[name] = value
    return merged


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _malformed()
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _malformed()
    return value


def _malformed() -> UpstreamError:
    return UpstreamError("The upstream engine sent a malformed chunk")
