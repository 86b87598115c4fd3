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
class TokenLogprob:
    """One generated token: its text, its log probability, and the ``top`` most likely tokens at that step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int, decode: Callable[[int], str]) -> TokenLogprob:
    """The log-softmax of one step's logits, for the chosen token and the ``top`` best (float64: a 32k-entry
    float32 sum loses digits)."""
    values = logits.reshape(-1).astype(np.float64)
    peak = float(values.max())
    log_total = peak + float(np.log(np.exp(values - peak).sum()))
    best: tuple[tuple[str, float], ...] = ()
    if top:
        ids = np.argpartition(-values, top - 1)[:top] if top < values.size else np.arange(values.size)
        ids = ids[np.argsort(-values[ids], kind="stable")]
        best = tuple((decode(int(i)), _finite(values[i] - log_total)) for i in ids)
    return TokenLogprob(decode(token), _finite(values[token] - log_total), best)


def _finite(value: float) -> float:
    return max(float(value), _FLOOR)
