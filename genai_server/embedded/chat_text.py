"""A conversation's message texts tokenised as text, never as control tokens.

The runtime's tokenizer parses special tokens wherever they appear in the text it is given, and the chat
template's output holds the client's messages: a client that typed ``<|im_end|>\\n<|im_start|>system`` got the real
tokens (one each, not nine) and could fake a turn of its own, a system message included. The template's own
markers must stay tokens, the client's text must not. So when a message holds a control token's text, the
conversation is rendered with a placeholder in each message's place, the template's parts are tokenised as they
are, and each message's text is tokenised apart, a control token's text split after its first character (so that
no piece is a control token: the model sees the characters). A conversation without such text is tokenised as
before, token for token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genai_server.errors import InvalidRequest

# Private-use characters: no template changes them, and no client text is taken for them (it is checked).
_MARK = "\ue000{}\ue001"


def control_texts(model_path: Path) -> re.Pattern[str] | None:
    """One pattern matching the texts of the tokenizer's special tokens (``tokenizer.json``'s added tokens marked
    special), longest first; None if the folder names none. Compiled once: a model may have hundreds (Llama 3: 256),
    and every request's text is searched for them."""
    try:
        added = json.loads((model_path / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, ValueError, AttributeError):
        return None
    texts = {t["content"] for t in added if isinstance(t, dict) and t.get("special") and len(t.get("content", "")) > 1}
    if not texts:
        return None
    return re.compile("|".join(re.escape(text) for text in sorted(texts, key=len, reverse=True)))


def refuse_controls_outside_text(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, controls: re.Pattern[str]
) -> None:
    """A control token's text anywhere a client writes but a message's text (a tool call's name or arguments, a
    tool call id, a tool's description) reaches the template as a token: a 400, whatever the messages' text."""
    elsewhere = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages], ensure_ascii=False)
    if controls.search(elsewhere):
        raise InvalidRequest(
            "A control token's text may appear in a message's text only, not in its tool calls or name",
            param="messages",
        )
    if tools and controls.search(json.dumps(tools, ensure_ascii=False)):
        raise InvalidRequest("A control token's text may not appear in tools", param="tools")


def encode_contents_as_text(
    messages: list[dict[str, Any]],
    controls: re.Pattern[str],
    *,
    render: Callable[[list[dict[str, Any]]], str],
    encode: Callable[[str], list[int]],
) -> list[int]:
    """The template's parts tokenised as they are; the text of each message holding a control token's text
    tokenised as text (the other messages are rendered with their own text, so the template sees them as ever)."""
    contents = [str(m.get("content") or "") for m in messages]
    if any("\ue000" in text or "\ue001" in text for text in contents):
        raise InvalidRequest("messages must not contain the characters U+E000 or U+E001", param="messages")
    marked = {i: _MARK.format(i) for i, text in enumerate(contents) if controls.search(text)}
    rendered = render([{**m, "content": marked[i]} if i in marked else m for i, m in enumerate(messages)])
    lead = encode("")  # what the tokenizer puts before any text (a BOS): kept once, at the very start
    tokens: list[int] = []
    at = 0
    for i, mark in marked.items():
        found = rendered.find(mark, at)
        if found < 0:  # the template left the message out, moved or changed it: its text cannot be placed safely
            raise InvalidRequest(
                "A message holds a control token's text, which this model's template cannot take as text",
                param=f"messages.{i}.content",
            )
        tokens += _without_lead(encode(rendered[at:found]), lead, keep=not tokens)
        tokens += _as_text(contents[i], controls, encode, lead)
        at = found + len(mark)
    rest = rendered[at:]
    if "\ue000" in rest:  # the template rendered a text twice: the mark would reach the model as characters
        raise InvalidRequest(
            "A message holds a control token's text, which this model's template cannot take as text", param="messages"
        )
    return tokens + _without_lead(encode(rest), lead, keep=not tokens)


def _as_text(text: str, controls: re.Pattern[str], encode: Callable[[str], list[int]], lead: list[int]) -> list[int]:
    """``text`` tokenised with every control token's text split after its first character."""
    tokens: list[int] = []
    at = 0
    for match in controls.finditer(text):
        for part in (text[at : match.start()], match.group()[:1], match.group()[1:]):
            if part:
                tokens += _without_lead(encode(part), lead, keep=False)
        at = match.end()
    if text[at:]:
        tokens += _without_lead(encode(text[at:]), lead, keep=False)
    return tokens


def _without_lead(tokens: list[int], lead: list[int], *, keep: bool) -> list[int]:
    if not keep and lead and tokens[: len(lead)] == lead:
        return tokens[len(lead) :]
    return tokens
