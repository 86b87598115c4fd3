"""Log probabilities of generated tokens, from the logits the engine sampled them from.

The engine's batched Engine API hands out tokens only; a sequence that asks for logprobs is stepped on a Generator,
whose logits (read before each step) are the distribution its next token is drawn from. They are the model's raw
distribution (before temperature, top-k/top-p and any grammar), as vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# JSON has no -infinity: a token the model rules out entirely is reported with OpenAI's floor.
_FLOOR = -9999.0


@dataclass(frozen=True)
class Alternative:
    """A token and its log probability: its text (``token_text``) and its own bytes."""

    token: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token (its text, bytes and log probability) and the ``top`` most likely tokens at that step."""

    token: str
    logprob: float
    raw: bytes = b""
    top: tuple[Alternative, ...] = ()


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: its UTF-8 text, or for bytes that are not whole UTF-8 (a piece of a
    multi-byte character) ``bytes:`` and their escapes, so that no two distinct tokens share a text (as "\ufffd")."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_logprob(logits: np.ndarray, token: int, top: int, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """The log-softmax of one step's logits, for the chosen token and the ``top`` best (float64: a 32k-entry
    float32 sum loses digits); each token named by its own bytes."""
    values = logits.reshape(-1).astype(np.float64)
    peak = float(values.max())
    log_total = peak + float(np.log(np.exp(values - peak).sum()))
    best: tuple[Alternative, ...] = ()
    if top:
        ids = np.argpartition(-values, top - 1)[:top] if top < values.size else np.arange(values.size)
        ids = ids[np.argsort(-values[ids], kind="stable")]
        best = tuple(_alternative(token_bytes(int(i)), values[i] - log_total) for i in ids)
    raw = token_bytes(token)
    return TokenLogprob(token_text(raw), _finite(values[token] - log_total), raw, best)


def _alternative(raw: bytes, logprob: float) -> Alternative:
    return Alternative(token_text(raw), _finite(logprob), raw)


def _finite(value: float) -> float:
    return max(float(value), _FLOOR)
