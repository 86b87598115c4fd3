"""Bytes that never form UTF-8 come out as U+FFFD, as HF transformers, vLLM and llama-server write them.

The random bundled model often writes such bytes: with the runtime's own stream they vanished (measured: the
greedy answer to "Hello" below lost 85 of them), so the same weights said different things on different engines.
"""

from __future__ import annotations

from typing import Any

from genai_server.embedded.detokenize import ByteStream, byte_table
from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import MODEL_ID
from tests.harness.responses import stream_chunks


def _decode(table: list[bytes], tokens: list[int]) -> str:
    stream = ByteStream(table)
    return "".join(stream.decode(t) for t in tokens) + stream.flush()


def test_a_character_split_over_tokens_is_held_until_whole_and_bad_bytes_are_replaced() -> None:
    table = [b"a", "é".encode()[:1], "é".encode()[1:], b"\xff", "🙂".encode()[:3]]
    stream = ByteStream(table)
    assert [stream.decode(t) for t in (0, 1, 2)] == ["a", "", "é"]
    assert _decode(table, [3, 0]) == "\ufffda"  # a byte that is never UTF-8
    assert _decode(table, [1, 0]) == "\ufffda"  # a character that was never finished
    assert _decode(table, [0, 4]) == "a\ufffd"  # ... at the end: flushed as U+FFFD, not dropped
    assert _decode(table, [99]) == ""  # out of the vocabulary: nothing


def test_the_bundled_tokenizer_is_read_byte_for_byte(tokenizer: Any) -> None:
    table = byte_table(BUNDLED_MODEL)
    assert table is not None and len(table) == 512
    text = 'Hello wörld, 日本語 🙂 {"a": 1}\n'
    assert b"".join(table[int(t)] for t in tokenizer.encode(text)) == text.encode()
    specials = [i for i, b in enumerate(table) if b == b""]
    assert len(specials) == 3  # <|endoftext|>, <|im_start|>, <|im_end|>: skipped, as decoding skips them


async def test_invalid_bytes_reach_the_client_as_replacement_characters(client: Any) -> None:
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 300, "temperature": 0}
    whole = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["text"]
    assert whole.count("\ufffd") > 10
    resp = await client.post("/v1/completions", json={**body, "stream": True})
    streamed = "".join(c["choices"][0]["text"] for c in stream_chunks(await resp.text()) if c["choices"])
    assert streamed == whole
