"""``logprobs`` / ``top_logprobs``, ``min_tokens`` and ``repetition_penalty`` on the embedded engine.

Logprobs come from the logits each token was drawn from (a Generator of its own: the batched Engine gives tokens
only). What holds on any box: one entry per generated token, log probabilities of at most 0, alternatives sorted
best first, and under greedy decoding the chosen token is the best one.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.responses import assert_same_greedy_text, stream_chunks


async def _json(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


def _own_bytes(entry: dict[str, Any]) -> None:
    """A token's ``bytes`` are its own: its text's UTF-8, or for a piece of a character (not whole UTF-8) the bytes
    its ``bytes:`` text spells out, as OpenAI writes them (not U+FFFD's, which rebuild nothing)."""
    raw = bytes(entry["bytes"])
    if entry["token"].startswith("bytes:"):
        assert entry["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
    else:
        assert raw == entry["token"].encode()


def _check_entries(entries: list[dict[str, Any]], top: int) -> None:
    for entry in entries:
        assert entry["logprob"] <= 0
        _own_bytes(entry)
        for alternative in entry["top_logprobs"]:
            _own_bytes(alternative)
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives), reverse=True)
        assert sum(math.exp(a["logprob"]) for a in alternatives) <= 1 + 1e-6
        assert entry["logprob"] == alternatives[0]["logprob"]  # greedy: the best token is the one chosen


async def test_chat_logprobs_give_every_token_and_its_best_alternatives(client: Any, openai_schema: Any) -> None:
    body = chat_body("Tell me a long story", max_tokens=24, logprobs=True, top_logprobs=3)
    answer = await _json(client, "/v1/chat/completions", body)
    openai_schema("CreateChatCompletionResponse", answer)
    entries = answer["choices"][0]["logprobs"]["content"]
    assert len(entries) == answer["usage"]["completion_tokens"] == 24
    _check_entries(entries, 3)
    plain = await _json(client, "/v1/chat/completions", chat_body("Tell me a long story", max_tokens=24))
    assert "logprobs" not in plain["choices"][0] or plain["choices"][0]["logprobs"] is None
    assert_same_greedy_text(answer["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"])


async def test_streamed_logprobs_are_the_whole_answers(client: Any, openai_schema: Any) -> None:
    body = chat_body("Tell me a long story", max_tokens=16, logprobs=True, top_logprobs=2)
    whole = (await _json(client, "/v1/chat/completions", body))["choices"][0]["logprobs"]["content"]
    resp = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = stream_chunks(await resp.text())
    streamed: list[dict[str, Any]] = []
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
        logprobs = chunk["choices"][0].get("logprobs") if chunk["choices"] else None
        streamed.extend((logprobs or {}).get("content") or [])
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4) for a, b in zip(streamed, whole, strict=True))


async def test_completion_logprobs_in_the_legacy_shape(client: Any, openai_schema: Any) -> None:
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    answer = await _json(client, "/v1/completions", body)
    openai_schema("CreateCompletionResponse", answer)
    logprobs = answer["choices"][0]["logprobs"]
    n = answer["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == n
    # Two tokens that are parts of characters have distinct texts (bytes:...), so no two alternatives merge.
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert len(top) == 2 and token in top and all(v <= 0 for v in top.values())
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0


async def test_min_tokens_holds_off_the_end(client: Any) -> None:
    # Without a template, the bundled model ends this prompt at once (greedy).
    body = {"model": MODEL_ID, "prompt": "What is the weather in Paris?", "max_tokens": 40, "temperature": 0}
    plain = await _json(client, "/v1/completions", body)
    assert plain["usage"]["completion_tokens"] < 5 and plain["choices"][0]["finish_reason"] == "stop"
    held = await _json(client, "/v1/completions", {**body, "min_tokens": 5})
    assert held["usage"]["completion_tokens"] >= 5


async def test_repetition_penalty_changes_a_repetitive_answer(client: Any) -> None:
    body = chat_body("Tell me a long story", max_tokens=80)
    plain = (await _json(client, "/v1/chat/completions", body))["choices"][0]["message"]["content"]
    same = await _json(client, "/v1/chat/completions", {**body, "repetition_penalty": 1.0})
    assert same["choices"][0]["message"]["content"] == plain
    penalised = await _json(client, "/v1/chat/completions", {**body, "repetition_penalty": 1.8})
    assert penalised["choices"][0]["message"]["content"] != plain


async def test_the_tokens_bytes_rebuild_the_answer(client: Any) -> None:
    """Joined, the tokens' bytes are the answer's (decoded as the answer is: bytes that never form UTF-8 are U+FFFD),
    however many tokens are pieces of characters (measured before: 9 of 10 answers did not rebuild)."""
    pieces = 0
    for prompt in ("Tell me a long story", "Écris une histoire", "写一个故事", "Hello there"):
        body = chat_body(prompt, max_tokens=60, logprobs=True, top_logprobs=1)
        answer = await _json(client, "/v1/chat/completions", body)
        entries = answer["choices"][0]["logprobs"]["content"]
        joined = b"".join(bytes(entry["bytes"]) for entry in entries)
        assert joined.decode("utf-8", errors="replace") == answer["choices"][0]["message"]["content"]
        pieces += sum(entry["token"].startswith("bytes:") for entry in entries)
    assert pieces, "no token was a piece of a character: the check above proved nothing"
