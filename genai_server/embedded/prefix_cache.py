"""Prefix reuse: which kept sequence a new prompt shares the longest prefix with, so that only the rest is prefilled.

A chat client sends the whole history on every turn; on a CPU, prefilling it again costs seconds. So does a prompt
sent again, or one that shares a long system prompt or document with an earlier one. A sequence the scheduler keeps
runs on an ``og.Generator``, which stays with its KV cache when the sequence ends, and ``Generator.rewind_to(n)``
cuts that cache to any length at no cost: a later prompt that shares its first ``n`` tokens rewinds it there and
prefills only what differs.

Measured facts of ONNX Runtime GenAI 0.18 that shape this (0.42B model, 2 cores):

* The Engine cannot do it: its cache can only be extended (``rewind_to_start_of_turn`` then re-runs the whole
  history: 3.63 s for 1000 tokens, a fresh prefill took 3.65 s), and only a request alone in its static batch can
  be continued at all ("Continuous decoding requires exactly one resident request in a static engine batch").
  ``Generator.rewind_to`` takes no time: the same 1000-token prompt again answered in 24 ms, with 20 new tokens
  after it in 82 ms. A Generator decodes one sequence as fast as the Engine does (77-80 tokens/s each here).
* The last token a Generator sampled has not been run through the model yet, so at most all tokens but the last are
  reused; and the prompt's last two tokens are always prefilled again. Measured: a last chunk of one token takes
  the decode path, whose rounding differs from a prefill's, and greedy text then differed from a fresh prefill's
  within six tokens (2 cases in 18); with two or more tokens, repeated and edited prompts gave exactly a fresh
  prefill's greedy text (24 of 24).
* A reply's own keys and values were computed by decode steps, so a prompt that continues a conversation is exact at
  the token level but not bit-identical to a fresh prefill: on the random-weight test models its greedy text may
  drift after a few tokens (3 cases in 12), as batched and single decoding do. Matching is on token ids only: a
  reply whose text does not tokenise back to the tokens generated shares only the prompt before it.
* A Generator's sampling settings are fixed when it is made: a kept sequence serves only a request with the same
  ones, and a seeded request never reuses (its random stream would differ from a fresh one's).

Cutting a kept sequence for another prompt loses its tail, which its own conversation's next turn would have reused:
a prompt may cut one only if it keeps at least two thirds of it (a shared document or system prompt, a repeated
prompt, an edited last message), never for a few shared template tokens. (llama.cpp's server takes a slot when the
common prefix is half of the new prompt, which can cut away a long conversation for a short question.)

Pure functions here; the scheduler owns the engine calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Fewer shared tokens than this are not worth taking a kept sequence for: prefilling them costs little.
MIN_REUSE = 8
# The tokens a reusing prompt always prefills itself (see above: one alone would take the decode path).
_OWN_TOKENS = 2


@dataclass(eq=False)
class Kept:
    """A finished sequence whose Generator, and its KV cache, stays for a later prompt that shares its prefix."""

    generator: Any  # og.Generator, owner thread only
    tokens: np.ndarray  # the Generator's sequence: every token fed or sampled
    capacity: int  # the tokens its cache was sized for (its max_length)
    sampling: tuple[Any, ...]  # the settings it samples with (``SamplingOptions.generator_settings``)
    kv_bytes: int
    used_at: float = 0.0
    scope: str = ""  # whose it is: only a prompt of the same scope may reuse it


@dataclass(frozen=True)
class Reuse:
    """What a prompt takes from a kept sequence: its first ``tokens`` tokens."""

    kept: Kept
    tokens: int


def reusable_tokens(prompt: np.ndarray, kept: Kept) -> int:
    """How many of ``kept``'s tokens ``prompt`` may reuse: the common prefix, less the last sampled token (not yet
    in the cache) and less the prompt's own last two tokens; 0 when that is too little to be worth it, or when it
    would cut away more than a third of the kept sequence."""
    tokens = kept.tokens
    length = min(len(tokens), len(prompt))
    differs = np.flatnonzero(tokens[:length] != prompt[:length])
    common = int(differs[0]) if len(differs) else length
    reuse = min(common, len(tokens) - 1, len(prompt) - _OWN_TOKENS)
    return 0 if reuse < MIN_REUSE or 3 * reuse < 2 * len(tokens) else reuse


def best_reuse(
    prompt: np.ndarray, candidates: list[Kept], *, scope: str, sampling: tuple[Any, ...], max_tokens: int
) -> Reuse | None:
    """The kept sequence of ``scope`` and ``sampling`` from which ``prompt`` reuses the most tokens, and whose cache
    has room for the prompt and ``max_tokens`` more. A sequence of another scope is never reused: which prompt
    reused whose shows in ``cached_tokens`` and in the time to first token, so a cache shared across owners would
    let one guess another's prompts."""
    best: Reuse | None = None
    for kept in candidates:
        if kept.scope != scope or kept.sampling != sampling or len(prompt) + max_tokens > kept.capacity:
            continue
        tokens = reusable_tokens(prompt, kept)
        if tokens and (best is None or tokens > best.tokens):
            best = Reuse(kept, tokens)
    return best
