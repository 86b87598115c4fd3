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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from genai_server.errors import InvalidRequest

# Private-use characters: no template changes them, and no client text is taken for them (it is checked).
_MARK = "\ue000{}\ue001"


def control_texts(model_path: Path) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (``tokenizer.json``'s added tokens marked special), longest
    first; none if the folder does not say."""
    try:
        added = json.loads((model_path / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, ValueError, AttributeError):
        return ()
    texts = {t["content"] for t in added if isinstance(t, dict) and t.get("special") and len(t.get("content", "")) > 1}
    return tuple(sorted(texts, key=len, reverse=True))


def encode_contents_as_text(
    messages: list[dict[str, Any]],
    contents: Sequence[str],
    controls: Sequence[str],
    *,
    render: Callable[[list[dict[str, Any]]], str],
    encode: Callable[[str], list[int]],
) -> list[int]:
    """The template's parts tokenised as they are, each message's text (``contents``) as text. A control token's
    text anywhere else a client writes (a tool call's name or arguments, a tool's description) is refused: it
    would reach the template as a token."""
    elsewhere = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages], ensure_ascii=False)
    if any(c in elsewhere for c in controls):
        raise InvalidRequest(
            "A control token's text may appear in a message's text only, not in its tool calls or name",
            param="messages",
        )
    if any("\ue000" in text or "\ue001" in text for text in contents):
        raise InvalidRequest("messages must not contain the characters U+E000 or U+E001", param="messages")
    marks = [_MARK.format(i) for i in range(len(messages))]
    rendered = render([{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)])
    lead = encode("")  # what the tokenizer puts before any text (a BOS): kept once, at the very start
    tokens: list[int] = []
    at = 0
    for mark, text in zip(marks, contents, strict=True):
        found = rendered.find(mark, at)
        if found < 0:  # the template left a message out or changed it: its text cannot be placed safely
            raise InvalidRequest(
                "A message holds a control token's text, which this model's template cannot take as text",
                param="messages",
            )
        tokens += _without_lead(encode(rendered[at:found]), lead, keep=not tokens)
        tokens += _as_text(text, controls, encode, lead)
        at = found + len(mark)
    return tokens + _without_lead(encode(rendered[at:]), lead, keep=not tokens)


def _as_text(text: str, controls: Sequence[str], encode: Callable[[str], list[int]], lead: list[int]) -> list[int]:
    """``text`` tokenised with every control token's text split after its first character."""
    pattern = "(" + "|".join(re.escape(c) for c in controls) + ")"
    tokens: list[int] = []
    for piece in re.split(pattern, text):
        parts = [piece[:1], piece[1:]] if piece in controls else [piece]
        for part in parts:
            if part:
                tokens += _without_lead(encode(part), lead, keep=False)
    return tokens


def _without_lead(tokens: list[int], lead: list[int], *, keep: bool) -> list[int]:
    if not keep and lead and tokens[: len(lead)] == lead:
        return tokens[len(lead) :]
    return tokens
