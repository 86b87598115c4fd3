"""Prefix reuse: which kept sequence a new prompt continues, so that only its new tokens are prefilled.

A chat client sends the whole history on every turn; on a CPU, prefilling it again costs seconds. The Engine
keeps a request's KV cache across turns: a second ``begin_turn`` on the same request continues after every token
the first turn prefilled and generated. So a sequence that ran alone in its lane is kept there when it ends, and
a later prompt whose tokens start with all of the kept ones (its history: the same prompt, then the reply the
client got back) continues it.

Measured facts of ONNX Runtime GenAI 0.18 that shape this:

* The cache can only be extended, never cut: ``rewind_to_start_of_turn`` re-runs the whole history (2670 tokens:
  1.5 s, as long as a fresh prefill), so a prompt that matches only part of a kept sequence starts afresh.
* Only a request that is alone in its static batch can be continued ("Continuous decoding requires exactly one
  resident request in a static engine batch"; closing its batch-mates does not help): a conversation is kept only
  when it ran alone in its Engine.
* A request's cache is sized once, when it is created (``RequestOptions.set_max_session_tokens``): a kept sequence
  is continued only by a prompt that fits what is left of it, prompt and ``max_tokens`` together.
* The end-of-sequence token is not written to the cache, so a reply that ended normally is continued by a prompt
  that repeats it and then closes the turn with the template's end marker.
* Reuse is exact at the token level: only a prompt whose token ids equal the kept ones is continued (the reply's
  text must tokenise back to the tokens generated; a model's usual output does, random weights' often not). The
  arithmetic is not bit-identical to a fresh prefill: a generated token's keys and values were computed by a
  one-token decode step, which rounds differently from a prefill; on the random-weight test models greedy text
  drifts after tens of tokens, as it does between batched and single decoding.

Pure functions here; the scheduler owns the Engine calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class Kept:
    """A finished sequence whose KV cache stays resident in its lane for the conversation's next turn."""

    request: Any  # og.Request, owner thread only
    tokens: list[int] = field(default_factory=list)  # every token in its cache: prompts and generated tokens
    used_at: float = 0.0
    scope: str = ""  # whose it is: only a prompt of the same scope may continue it
    capacity: int = 0  # tokens its cache was sized for: prompts and generated tokens of every turn together


def best_reuse(prompt: np.ndarray, candidates: list[Kept], scope: str = "", max_tokens: int = 0) -> Kept | None:
    """The kept sequence of ``scope`` that ``prompt`` continues (its tokens, then at least one more) with the most
    tokens, and whose cache has room for the prompt and ``max_tokens`` more. A sequence of another scope is never
    continued: which prompt continued whose conversation shows in ``cached_tokens`` and in the time to first token,
    so a cache shared across owners would let one guess another's prompts."""
    best: Kept | None = None
    for kept in candidates:
        n = len(kept.tokens)
        if kept.scope != scope or n >= len(prompt) or (best is not None and n <= len(best.tokens)):
            continue
        if kept.capacity and len(prompt) + max_tokens > kept.capacity:
            continue
        if np.array_equal(prompt[:n], kept.tokens):
            best = kept
    return best
