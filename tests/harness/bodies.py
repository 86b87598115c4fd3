"""The request bodies tests send to the bundled model, so that every test asks the same way."""

from __future__ import annotations

from typing import Any

from genai_server.settings import BUNDLED_MODEL

MODEL_ID = BUNDLED_MODEL.name
# A prompt on which the bundled model's greedy output runs ~1970 tokens before the end-of-sequence token
# (most prompts stop within a few hundred): what a test uses to keep a slot or a batch busy.
LONG_PROMPT = "Tell me a long story"


def chat_body(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    """A chat request body for the bundled model."""
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    body.update(extra)
    return body


def long_stream(max_tokens: int = 1900) -> dict[str, Any]:
    """A streaming chat request that keeps generating for ~max_tokens tokens (a slot or batch kept busy)."""
    return chat_body(content=LONG_PROMPT, max_tokens=max_tokens, stream=True)
