"""Prefix reuse: a prompt prefills only what it does not share with a kept sequence, and says so in usage.

A kept sequence holds its prompt and the tokens it generated; a later prompt reuses the prefix their token ids
share, except the last token sampled (never run through the model) and the prompt's own last two tokens. A client
sends text back, so a next turn continues the reply only if it tokenises back to the tokens generated: random
weights' replies often do not. The tests therefore look for replies that do (prompt, reply ids) and assert what a
client sees: how many tokens were reused, and the same greedy text as without reuse.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from genai_server.embedded.prefix_cache import Kept, best_reuse, reusable_tokens
from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import ClientFactory
from tests.harness.responses import assert_same_greedy_text, metric_sample, stream_chunks

SEEDS = [f"Story number {i} about a {w}" for i, w in enumerate(["river", "cat", "storm", "lamp", "tower", "bird"] * 4)]
QUESTION = " And then what happened next in the story?"
QUESTIONS = [QUESTION, " Tell me more about it, please.", " Why?", " Write it again as a poem about the sea."]
# A turn's reply: short, because the longer a random-weight reply, the less often its text tokenises back to the
# tokens generated (on the bundled model: 12 of 24 two-token replies do, 1 of 24 six-token ones).
REPLY_TOKENS = 2
# Makes a prompt long enough (over 256 tokens of the bundled tokenizer) to run alone and be kept.
DOCUMENT = "The river runs past the old city at night and the light is green. " * 12


def _reused(prompt: list[int], reply: list[int]) -> int:
    """What a next turn that repeats ``prompt`` and ``reply`` reuses: all but the reply's last token, which was
    sampled and never run through the model."""
    return len(prompt) + len(reply) - 1


def _common(a: list[int], b: list[int]) -> int:
    """How many first token ids ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def _complete(
    client: TestClient[Any, Any],
    prompt: list[int],
    max_tokens: int = REPLY_TOKENS,
    key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    request = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await client.post("/v1/completions", json=request, headers=headers)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _cached(body: dict[str, Any]) -> int:
    cached: int = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    return cached


async def _turns(
    client: TestClient[Any, Any], tokenizer: Any, count: int, key: str | None = None, document: str = ""
) -> list[tuple[list[int], list[int]]]:
    """``count`` (prompt, reply ids) pairs whose reply, sent back as text, is continued from the kept sequence:
    each is checked on ``client`` (a server keeping at least one conversation; with API ``key``), whose kept
    sequences the probes leave behind: a test then uses a server of its own. Each prompt is ``document``, then a
    seed."""
    found: list[tuple[list[int], list[int]]] = []
    question = [int(t) for t in tokenizer.encode(QUESTION)]
    for seed in SEEDS:
        prompt = [int(t) for t in tokenizer.encode(document + seed)]
        body = await _complete(client, prompt, key=key)
        reply = [int(t) for t in tokenizer.encode(body["choices"][0]["text"])]
        if len(reply) != body["usage"]["completion_tokens"]:
            continue  # the text does not tokenise back to as many tokens: cannot be the same ids
        cached = _cached(await _complete(client, prompt + reply + question, key=key))
        assert cached <= _reused(prompt, reply), (cached, len(prompt), len(reply))
        if cached == _reused(prompt, reply):
            found.append((prompt, reply))
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} of {len(SEEDS)} replies tokenise back to the tokens generated")


async def test_next_turn_prefills_only_its_new_tokens(make_client: ClientFactory, tokenizer: Any) -> None:
    [(prompt, reply)] = await _turns(await make_client(), tokenizer, 1)
    fresh_client = await make_client(prefix_cache_conversations=0)
    compared = 0
    for ask in QUESTIONS:
        client = await make_client()  # only turn 1 kept
        question = [int(t) for t in tokenizer.encode(ask)]
        await _complete(client, prompt)  # turn 1 again: kept
        turn2 = prompt + reply + question
        continued = await _complete(client, turn2, max_tokens=40)
        assert _cached(continued) == _reused(prompt, reply)
        assert continued["usage"]["prompt_tokens"] == len(turn2)
        # The same prompt without reuse: the same tokens counted, and the same greedy text (reused keys and values
        # were computed by decode steps, which round differently from a prefill: only the beginning is certain).
        fresh = await _complete(fresh_client, turn2, max_tokens=40)
        assert _cached(fresh) == 0
        assert fresh["usage"]["prompt_tokens"] == len(turn2)
        assert_same_greedy_text(continued["choices"][0]["text"], fresh["choices"][0]["text"])
        compared += len(fresh["choices"][0]["text"]) // 2
    assert compared >= 40  # enough text compared for a wrong token in the reused prefix to show

    exposition = await (await client.get("/metrics")).text()
    assert metric_sample(exposition, "genai_server_prompt_tokens_cached_total", model=MODEL_ID) >= len(prompt)


async def test_conversations_that_run_at_once_are_all_continued(make_client: ClientFactory, tokenizer: Any) -> None:
    """Three conversations over long documents send their turns at the same time. Each runs on a Generator of its
    own, so each next turn continues its own kept sequence; in one batch none could be kept (the engine keeps
    nothing it could cut or share)."""
    client = await make_client()
    # A document of its own each: sharing one, a conversation that ends first may lend its prefix to another that
    # arrives after it (cutting its own short tail), which is reuse too, but not what this test counts.
    discovery = await make_client()
    found = [(await _turns(discovery, tokenizer, 1, document=f"{i}: {DOCUMENT}"))[0] for i in range(3)]
    assert min(len(prompt) for prompt, _ in found) >= 256  # long enough to be worth keeping
    question = [int(t) for t in tokenizer.encode(QUESTION)]
    for _ in range(2):
        await asyncio.gather(*(_complete(client, prompt) for prompt, _ in found))  # turn 1 again, all at once
        answers = await asyncio.gather(*(_complete(client, prompt + reply + question) for prompt, reply in found))
        assert [_cached(answer) for answer in answers] == [_reused(prompt, reply) for prompt, reply in found]


async def test_a_turn_too_long_for_the_kept_cache_starts_afresh_and_is_not_cut_short(
    make_client: ClientFactory, tokenizer: Any
) -> None:
    """A kept sequence's cache was sized when it began (twice its first turn, rounded up: 256 tokens here) and
    cannot grow; a next turn that may need more is prefilled whole into a larger one, never ended early."""
    client = await make_client()
    [(prompt, reply)] = await _turns(await make_client(), tokenizer, 1)
    turn2 = prompt + reply + [int(t) for t in tokenizer.encode(QUESTION)]
    await _complete(client, prompt)
    answer = await _complete(client, turn2, max_tokens=300)
    assert _cached(answer) == 0
    finish, generated = answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]
    assert finish == "stop" or generated == 300, (finish, generated)


async def test_a_prompt_reuses_exactly_the_prefix_it_shares(make_client: ClientFactory, tokenizer: Any) -> None:
    """The same prompt again, another question on the same document, an edited reply: each reuses the token ids it
    shares with the kept sequence (less its own last two tokens) and answers with the greedy text of a server
    without reuse. A prompt that differs from the first token, or that would keep less than two thirds of the kept
    sequence, reuses nothing, and the kept sequence stays whole for its own next turn."""
    client = await make_client()
    fresh_client = await make_client(prefix_cache_conversations=0)
    [(prompt, reply)] = await _turns(await make_client(), tokenizer, 1, document=DOCUMENT)
    kept = prompt + reply
    document = [int(t) for t in tokenizer.encode(DOCUMENT)]
    question = [int(t) for t in tokenizer.encode(QUESTION)]
    shared = {
        "the same prompt": prompt,
        "another question on the document": document + question,
        "an edited reply": prompt + reply[:-1] + question,
    }
    for name, other in shared.items():
        await _complete(client, prompt)  # kept again: the prompt and its (greedy, so same) reply
        answer = await _complete(client, other, max_tokens=24)
        expected = min(_common(kept, other), len(kept) - 1, len(other) - 2)
        assert 3 * expected >= 2 * len(kept), name  # the case shares enough to be worth it
        assert _cached(answer) == expected, name
        fresh = await _complete(fresh_client, other, max_tokens=24)
        assert_same_greedy_text(answer["choices"][0]["text"], fresh["choices"][0]["text"])
    for name, other in {
        "another first token": [kept[0] + 1, *kept[1:]],
        "less than two thirds": kept[: len(kept) // 2],
    }.items():
        await _complete(client, prompt)
        assert _cached(await _complete(client, other)) == 0, name
        assert _cached(await _complete(client, kept + question)) == _reused(prompt, reply), name


async def test_a_kept_sequence_serves_only_the_same_sampling_settings(
    make_client: ClientFactory, tokenizer: Any
) -> None:
    """A Generator samples with the settings it was made with: another temperature cannot reuse it."""
    client = await make_client()
    [(prompt, reply)] = await _turns(await make_client(), tokenizer, 1)
    turn2 = prompt + reply + [int(t) for t in tokenizer.encode(QUESTION)]
    await _complete(client, prompt)
    assert _cached(await _complete(client, turn2, temperature=0.7)) == 0
    await _complete(client, prompt)
    assert _cached(await _complete(client, turn2)) == _reused(prompt, reply)


async def test_the_least_recently_used_conversation_is_dropped_first(
    make_client: ClientFactory, tokenizer: Any
) -> None:
    question = [int(t) for t in tokenizer.encode(QUESTION)]
    [(a, a_reply), (b, _)] = await _turns(await make_client(), tokenizer, 2)
    for keep, expected in ((1, 0), (2, _reused(a, a_reply))):
        client = await make_client(prefix_cache_conversations=keep)
        await _complete(client, a)
        await _complete(client, b)
        assert _cached(await _complete(client, a + a_reply + question)) == expected


async def test_a_kept_conversation_gives_way_to_new_work(make_client: ClientFactory, tokenizer: Any) -> None:
    """A budget that holds one whole-context sequence and a little more: the kept conversation (a small cache) is
    dropped so that a request that may fill the whole context can run; without it, the kept one stays."""
    decoder = json.loads((BUNDLED_MODEL / "genai_config.json").read_text())["model"]["decoder"]
    per_token = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * 4
    budget_mb = 1.2 * per_token * 1024 / 2**20
    client = await make_client(max_model_len=1024, engine_memory_budget_mb=budget_mb)
    [(a, a_reply)] = await _turns(await make_client(), tokenizer, 1)
    question = [int(t) for t in tokenizer.encode(QUESTION)]
    other = [int(t) for t in tokenizer.encode("Something else entirely")]
    for other_max_tokens, cached in ((REPLY_TOKENS, _reused(a, a_reply)), (1024 - len(other), 0)):
        await _complete(client, a)
        answer = await _complete(client, other, max_tokens=other_max_tokens)
        assert answer["usage"]["completion_tokens"] >= 1
        assert _cached(await _complete(client, a + a_reply + question)) == cached


async def test_chat_usage_says_how_many_prompt_tokens_were_cached(client: Any, openai_schema: Any) -> None:
    body = await (await client.post("/v1/chat/completions", json=chat_body())).json()
    openai_schema("CreateChatCompletionResponse", body)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

    resp = await client.post(
        "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True})
    )
    chunks = stream_chunks(await resp.text())
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert resp.headers.get("x-cached-prompt-tokens") is None  # a stream's headers leave before it is known

    whole = await client.post("/v1/chat/completions", json=chat_body())
    assert whole.headers["x-cached-prompt-tokens"] == str(_cached(await whole.json()))


async def test_a_conversation_is_continued_only_by_its_own_key_and_salt(
    make_client: ClientFactory, tokenizer: Any
) -> None:
    """Whether a prompt continued a kept conversation shows in ``cached_tokens`` (and in the time to first token):
    shared across API keys, one client could test guesses of another's prompt. Reuse stays within a key, and within
    a ``cache_salt`` when the client sends one (vLLM's field); the same key and salt still reuse (the control)."""
    client = await make_client(api_keys="key-a,key-b")
    [(prompt, reply)] = await _turns(await make_client(api_keys="key-a,key-b"), tokenizer, 1, key="key-a")
    turn2 = prompt + reply + [int(t) for t in tokenizer.encode(QUESTION)]
    kept = _reused(prompt, reply)

    await _complete(client, prompt, key="key-a")  # turn 1 again: kept, owned by key-a
    assert _cached(await _complete(client, turn2, key="key-b")) == 0, "another key's conversation"
    await _complete(client, prompt, key="key-a")
    assert _cached(await _complete(client, turn2, key="key-a")) == kept, "its own: continued"

    await _complete(client, prompt, key="key-a", cache_salt="tenant-1")
    assert _cached(await _complete(client, turn2, key="key-a", cache_salt="tenant-2")) == 0, "another salt"
    await _complete(client, prompt, key="key-a", cache_salt="tenant-1")
    assert _cached(await _complete(client, turn2, key="key-a", cache_salt="tenant-1")) == kept, "its own salt"


async def test_a_cache_salt_is_bounded(client: TestClient[Any, Any]) -> None:
    for salt in ("", "s" * 1025, 7):
        resp = await client.post(
            "/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "cache_salt": salt}
        )
        assert resp.status == 400, salt
        assert (await resp.json())["error"]["param"] == "cache_salt"


def _kept(tokens: list[int], scope: str = "") -> Kept:
    return Kept(None, np.array(tokens, dtype=np.int32), 1024, (True, 1.0), 0, 0.0, scope)


def test_the_reuse_rules_at_their_edges() -> None:
    """What a prompt takes from a kept sequence of 30 tokens, at each rule's edge."""
    kept = _kept(list(range(100, 130)))
    prompt = np.array([*range(100, 130), 7, 8], dtype=np.int32)
    assert reusable_tokens(prompt, kept) == 29  # all but the last token sampled, never run through the model
    assert reusable_tokens(prompt[:30], kept) == 28  # the same tokens again: its own last two are prefilled
    assert reusable_tokens(prompt[:22], kept) == 20  # two thirds of the kept sequence: it may be cut
    assert reusable_tokens(prompt[:21], kept) == 0  # less than two thirds
    assert reusable_tokens(prompt[:2], kept) == 0
    short = np.array([*range(100, 108), 1, 2, 3], dtype=np.int32)
    assert reusable_tokens(short, _kept(list(range(100, 108)))) == 0  # 7 tokens: not worth a kept sequence

    def best(candidates: list[Kept], **overrides: Any) -> Kept | None:
        arguments: dict[str, Any] = {"scope": "", "sampling": (True, 1.0), "max_tokens": 1024 - len(prompt)}
        reuse = best_reuse(prompt, candidates, **(arguments | overrides))
        return None if reuse is None else reuse.kept

    assert best([kept]) is kept
    assert best([kept], max_tokens=1024 - len(prompt) + 1) is None  # the cache has no room for the answer
    assert best([kept], scope="another key") is None
    assert best([kept], sampling=(False, 0.7, 1.0, 0, 1.0)) is None
    longer = _kept([*range(100, 130), 7])
    assert best([kept, longer]) is longer  # the one it shares more with
