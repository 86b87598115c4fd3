"""Tool calls on the embedded engine: how a model writes a call, the grammar that makes it write one, and the
reader that takes calls back out of the text it wrote.

The engine renders ``tools`` into the model's own chat template but has no tool-call parser: that is ours. A
model writes calls in its template's convention, and three are common:

- ``hermes`` (Hermes, Qwen 2.5/3, and the bundled model): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>``, one block per call, possibly after some text;
- ``phi4_mini`` (Phi-4-mini): ``functools[{"name": ..., "arguments": {...}}, ...]`` as the whole answer;
- ``llama3_json`` (Llama 3.1-3.3): ``{"name": ..., "parameters": {...}}`` as the whole answer, calls joined by ``; ``.

The convention is read from the template itself (``detect_format``). A call's arguments are held to the
function's JSON schema by the engine's grammar (llguidance's Lark dialect with ``%json``), for ``auto`` too: there
the answer is either text that does not begin a call, or calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from genai_server.embedded.call_arguments import ArgumentCheck

# How a request lets the model use its tools: not at all, as it likes, at least once, or one named function.
Choice = Literal["none", "auto", "required"] | tuple[Literal["function"], str]

# Separators as json.dumps writes them: a call the model wrote renders back into the template byte for byte,
# so the next turn's prompt continues the cached conversation (``prefix_cache.py``).
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


# A function that declares no parameters takes none (OpenAI: "omitting parameters defines a function with an
# empty parameter list"); an open object would let a weak model write keys forever.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text, as the OpenAI API carries it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Function:
    """A function the model may call, with its parameters' JSON schema (None: any object)."""

    name: str
    parameters: dict[str, Any] | None


@dataclass(frozen=True)
class CallFormat:
    """One convention: what opens the calls, what closes each, how they are joined, the arguments' key, and
    whether calls may follow text (Hermes) or must be the whole answer."""

    name: str
    opener: str
    closer: str
    joiner: str
    args_key: str
    after_text: bool

    def grammar(self, functions: list[Function], choice: Choice, *, parallel: bool, answer: str | None) -> str:
        """The Lark grammar for one request. ``answer`` is what ``auto`` allows instead of calls: a ``%json``
        schema from ``response_format``, or None for any text that does not begin a call."""
        if isinstance(choice, tuple):
            functions = [f for f in functions if f.name == choice[1]]
        join = _lark_string(self.joiner)
        if self.after_text:  # each call in its own block
            rows = [f'calls: call ("{join}" call)*' if parallel else "calls: call", f"call: {self._wrap('fcall')}"]
        else:
            listed = f'fcall ("{join}" fcall)*' if parallel else "fcall"
            rows = [f"calls: {self._wrap(listed)}"]
        rows.append(f"fcall: %json {json.dumps(self._calls_schema(functions))}")
        if choice != "auto":
            return "\n".join(["start: calls", *rows])
        if answer is not None:
            return "\n".join(["start: answer | calls", f"answer: %json {answer}", *rows])
        # Text that begins like a call is a call: a weak model cannot half-write one as text.
        text = f"TEXT: /(.|\\n)+/ & ~/{_lark_regex(self.begins)}(.|\\n)*/"
        return "\n".join(["start: TEXT | calls", text, *rows])

    @property
    def begins(self) -> str:
        """What an answer that is calls begins with."""
        return self.opener.strip() or "{"

    def _wrap(self, rule: str) -> str:
        parts = [f'"{_lark_string(self.opener)}"' if self.opener else "", rule]
        parts.append(f'"{_lark_string(self.closer)}"' if self.closer else "")
        return " ".join(p for p in parts if p)

    def _calls_schema(self, functions: list[Function]) -> dict[str, Any]:
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    self.args_key: _NO_PARAMETERS if f.parameters is None else f.parameters,
                },
                "required": ["name", self.args_key],
                "additionalProperties": False,
            }
            for f in functions
        ]
        return {"anyOf": variants, "x-guidance": _JSON_STYLE}

    def write(self, calls: list[dict[str, Any]]) -> str:
        """Calls (name, arguments object) as this model writes them: for a template that cannot render them."""
        bodies = [json.dumps({"name": c["name"], self.args_key: c["arguments"]}, ensure_ascii=False) for c in calls]
        if self.after_text:
            return self.joiner.join(self.opener + b + self.closer for b in bodies)
        return self.opener + self.joiner.join(bodies) + self.closer


HERMES = CallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments", after_text=True)
PHI4_MINI = CallFormat("phi4_mini", "functools[", "]", ", ", "arguments", after_text=False)
LLAMA3_JSON = CallFormat("llama3_json", "", "", "; ", "parameters", after_text=False)


def detect_format(template: str) -> tuple[CallFormat, bool]:
    """The convention a chat template teaches, and whether the template renders tools itself. A template that
    knows nothing of tools gets them described in a system message, in the Hermes convention."""
    if "functools" in template or "<|tool|>" in template:
        return PHI4_MINI, True
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON, True
    return HERMES, "tools" in template


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """A system message that teaches tools to a model whose template does not (the Hermes convention)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call functions to answer. Their signatures:\n"
        f"<tools>\n{listed}\n</tools>\n"
        'To call one, write <tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
    )


class CallReader:
    """Reads one choice's streamed text: text that is not part of a call comes out as soon as it cannot be,
    calls as soon as each is complete. Text that looks like a call but is not valid JSON, or names a function that
    was not declared (``functions``, each with its arguments' check; None: any), stays text: a returned call is
    always one the client offered. A call written after some text was outside the tool grammar (``auto`` allows
    text or calls), so its arguments are checked against the function's schema too (``call_arguments.py``); one
    that does not fit stays text. A call the choice ended in the middle of (cut by ``max_tokens``) is dropped: it is
    neither a call nor the answer."""

    def __init__(self, fmt: CallFormat, functions: Mapping[str, ArgumentCheck] | None = None) -> None:
        self._fmt = fmt
        self._functions = functions
        self._buffer = ""
        self._decided = fmt.after_text  # whole-answer formats: is this answer calls, or text?
        self._calls_only = False
        self._wrote_text = False  # text came first: what follows was not written under the tool grammar
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add generated text; return (text to emit now, calls completed now)."""
        self._buffer += text
        if not self._fmt.after_text:
            return self._feed_whole_answer()
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = self._buffer.find(self._fmt.opener)
            if start < 0:
                keep = _partial_suffix(self._buffer, self._fmt.opener)
                content.append(self._content(self._buffer[: len(self._buffer) - keep]))
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            content.append(self._content(self._buffer[:start]))
            end = self._buffer.find(self._fmt.closer, start + len(self._fmt.opener))
            if end < 0:
                self._buffer = self._buffer[start:]
                break
            block = self._buffer[start : end + len(self._fmt.closer)]
            self._buffer = self._buffer[end + len(self._fmt.closer) :]
            found = self._parse([block[len(self._fmt.opener) : -len(self._fmt.closer)]])
            calls.extend(found)
            if not found:
                content.append(block)
                self._wrote_text = True
        return "".join(content), calls

    def finish(self, *, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """The choice ended (``cut``: by ``max_tokens``): what is left. A call opened and never closed is dropped; a
        whole-answer format's calls that do not parse are dropped when the answer was cut, else they stay text."""
        rest, self._buffer = self._buffer, ""
        if self._calls_only:
            stripped = rest.strip()
            bodies = _split_json(stripped[len(self._fmt.opener) : len(stripped) - len(self._fmt.closer)])
            if stripped.endswith(self._fmt.closer) and bodies is not None:
                calls = self._parse(bodies)
                if calls:
                    return "", calls
            if cut:
                return "", []
        if self._fmt.after_text and rest.startswith(self._fmt.opener):  # a call opened and never closed
            return "", []
        if cut and rest and self._fmt.opener.startswith(rest):  # cut while it wrote a call's opening marker
            return "", []
        return self._content(rest), []

    def _feed_whole_answer(self) -> tuple[str, list[ToolCall]]:
        if not self._decided:
            head, begins = self._buffer.lstrip(), self._fmt.begins
            if len(head) < len(begins) and begins.startswith(head):
                return "", []  # too early to tell
            self._decided, self._calls_only = True, head.startswith(begins)
        if self._calls_only:
            return "", []
        text, self._buffer = self._buffer, ""
        return text, []

    def _parse(self, bodies: list[str]) -> list[ToolCall]:
        """Calls from their JSON texts; none unless every one is a call."""
        calls = []
        for body in bodies:
            try:
                value = json.loads(body)
            except ValueError:
                return []
            arguments = value.get(self._fmt.args_key, value.get("arguments")) if isinstance(value, dict) else None
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                return []
            if self._functions is not None:
                check = self._functions.get(value["name"])
                if check is None:
                    return []  # not a function the client offered: the model's text, not a call
                if self._wrote_text and not check(arguments if arguments is not None else {}):
                    return []  # outside the grammar, and its arguments do not fit the function's schema
            calls.append(ToolCall(new_call_id(), value["name"], json.dumps(arguments or {}, ensure_ascii=False)))
        self.calls += len(calls)
        return calls

    def _content(self, text: str) -> str:
        # The line breaks between and after calls are the format's, not the answer's.
        if self.calls and not text.strip():
            return ""
        self._wrote_text = self._wrote_text or bool(text.strip())
        return text


def new_call_id() -> str:
    """An id in OpenAI's style (``call_`` and 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


def _split_json(text: str) -> list[str] | None:
    """JSON values one after another, with separators (``,`` or ``;``) between them; None if it is not that."""
    decoder, bodies, at = json.JSONDecoder(), [], 0
    while at < len(text):
        while at < len(text) and text[at] in " \n\t,;":
            at += 1
        if at == len(text):
            break
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return None
        bodies.append(text[at:end])
        at = end
    return bodies


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``: held back, it may be a call's start."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _lark_string(text: str) -> str:
    return json.dumps(text)[1:-1]


def _lark_regex(text: str) -> str:
    return re.escape(text).replace("/", "\\/")
