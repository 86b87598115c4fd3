"""A reasoning model's thinking read out of its text: a ``<think>…</think>`` section at the start of the answer
(Qwen3, DeepSeek-R1 distills, Phi-4-mini-reasoning), opened by the model or already by the chat template's
generation prompt. Its text becomes ``reasoning_content``; what follows ``</think>`` is the answer.

Text arrives in pieces, and a tag may be split across them: what could still be the start of a tag is held back
until the next piece says (as stop strings are, ``stop_strings.py``).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# Qwen3's template writes this after the generation prompt when ``enable_thinking`` is false: an empty section.
EMPTY_SECTION = "<think>\n\n</think>\n\n"


def opens_thinking(template: str) -> bool:
    """Whether a chat template is one of a reasoning model's (it writes or opens thinking sections)."""
    return OPEN in template


def prompt_opens_section(prompt_tail: str) -> bool:
    """Whether the prompt's end (its last tokens as text) leaves a thinking section open for the answer."""
    return prompt_tail.rstrip().endswith(OPEN)


class ReasoningSplitter:
    """One choice's text split into (reasoning, answer) as it arrives."""

    def __init__(self, *, opened: bool) -> None:
        """``opened``: the prompt ends inside a thinking section (the template opened it)."""
        self._state = "thinking" if opened else "start"
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer text this piece adds."""
        held = self._held + text
        self._held = ""
        if self._state == "start":
            stripped = held.lstrip()
            if stripped.startswith(OPEN):
                self._state, held = "thinking", stripped[len(OPEN) :].lstrip("\n")
            elif OPEN.startswith(stripped):  # all whitespace, or the start of the tag: not yet known
                self._held = held
                return "", ""
            else:
                self._state = "answer"
                return "", held
        if self._state == "thinking":
            return self._thinking(held)
        return "", held

    def flush(self) -> tuple[str, str]:
        """The choice ended: whatever was held back, as what it was part of."""
        held, self._held = self._held, ""
        return (held, "") if self._state == "thinking" else ("", held)

    def _thinking(self, text: str) -> tuple[str, str]:
        end = text.find(CLOSE)
        if end >= 0:
            self._state = "answer"
            return text[:end], text[end + len(CLOSE) :].lstrip("\n")
        keep = _partial_tag(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], ""


def _partial_tag(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``</think>``."""
    for size in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-size:]):
            return size
    return 0
