"""POST /v1/completions: raw prompts, no template."""

from __future__ import annotations

from typing import Any

from tests.harness.bodies import MODEL_ID
from tests.harness.responses import stream_chunks


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, **extra}


async def test_completion_uses_the_raw_prompt(client: Any, tokenizer: Any, openai_schema: Any) -> None:
    resp = await client.post("/v1/completions", json=_body())
    assert resp.status == 200
    body = await resp.json()
    openai_schema("CreateCompletionResponse", body)
    assert body["object"] == "text_completion"
    prompt_tokens = len(tokenizer.encode("Once upon a time"))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 7,
        "total_tokens": prompt_tokens + 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["choices"][0]["finish_reason"] == "length"


async def test_completion_stream_matches_the_whole_text(client: Any) -> None:
    whole = await (await client.post("/v1/completions", json=_body(max_tokens=20))).json()
    resp = await client.post(
        "/v1/completions", json=_body(max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    chunks = stream_chunks(await resp.text())
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 20


async def test_token_id_prompts_and_prompt_lists(client: Any, tokenizer: Any) -> None:
    ids = [int(t) for t in tokenizer.encode("Once upon a time")]
    by_ids = await (await client.post("/v1/completions", json=_body(prompt=ids))).json()
    by_text = await (await client.post("/v1/completions", json=_body())).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]

    resp = await client.post("/v1/completions", json=_body(prompt=["Once upon a time", "Hello"], n=2))
    body = await resp.json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(tokenizer.encode("Hello"))
    assert body["usage"]["completion_tokens"] == 4 * 7


async def test_non_ascii_prompt_is_counted_by_the_model_tokenizer(client: Any, tokenizer: Any) -> None:
    prompt = "Café 日本語 🙂 straße"
    body = await (await client.post("/v1/completions", json=_body(prompt=prompt))).json()
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt))


async def test_stream_interval_sends_tokens_in_groups_after_the_first(make_client: Any) -> None:
    """STREAM_INTERVAL=4: the first token alone (time to first token), then chunks of up to four tokens; the
    text is the same as unstreamed."""
    client = await make_client(stream_interval=4)
    whole = await (await client.post("/v1/completions", json=_body(max_tokens=21))).json()
    resp = await client.post("/v1/completions", json=_body(max_tokens=21, stream=True))
    texts = [c["choices"][0]["text"] for c in stream_chunks(await resp.text()) if c["choices"]]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert 2 <= len(texts) <= 1 + 20 // 4 + 1  # the first token, five groups of four, the finish chunk
