"""POST /v1/chat/completions on the real bundled model, streamed and not."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from genai_server.embedded.engine import FALLBACK_CHAT_TEMPLATE
from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import embedded_engine
from tests.harness.responses import assert_same_greedy_text, stream_chunks


def _prompt_tokens(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> int:
    text = tokenizer.apply_chat_template(json.dumps(messages), template_str=template, add_generation_prompt=True)
    return len(tokenizer.encode(text))


async def _chat(client: Any, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/chat/completions", json=chat_body(**body))
    assert resp.status == 200, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def test_chat_returns_an_openai_completion_with_exact_usage(
    client: Any, tokenizer: Any, openai_schema: Any
) -> None:
    body = await _chat(client, content="Hello there", max_tokens=12)
    openai_schema("CreateChatCompletionResponse", body)
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL_ID
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    expected_prompt = _prompt_tokens(tokenizer, [{"role": "user", "content": "Hello there"}])
    assert body["usage"] == {
        "prompt_tokens": expected_prompt,
        "completion_tokens": 12,
        "total_tokens": expected_prompt + 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert len(tokenizer.encode(choice["message"]["content"])) > 0


async def test_max_completion_tokens_wins_over_max_tokens(client: Any) -> None:
    body = await _chat(client, max_tokens=3, max_completion_tokens=5)
    assert body["usage"]["completion_tokens"] == 5


async def test_roles_and_content_parts_reach_the_template(client: Any, tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    resp = await client.post("/v1/chat/completions", json={**chat_body(), "messages": messages})
    assert resp.status == 200
    flat = [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Hi there"} for m in messages
    ]
    assert (await resp.json())["usage"]["prompt_tokens"] == _prompt_tokens(tokenizer, flat)


async def test_developer_role_is_rendered_as_system(client: Any, tokenizer: Any) -> None:
    messages = [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Hi"}]
    body = await _chat(client, messages=messages)
    as_system = [{"role": "system", "content": "Rules"}, {"role": "user", "content": "Hi"}]
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(tokenizer, as_system)


async def test_greedy_output_is_the_same_streamed_alone_and_in_a_batch(client: Any) -> None:
    alone = await _chat(client, max_tokens=16)
    together = await asyncio.gather(*[_chat(client, max_tokens=16) for _ in range(4)])
    for result in together:
        assert_same_greedy_text(result["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"])


async def test_stream_has_role_first_finish_last_usage_and_done(client: Any, openai_schema: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=10, stream=True, stream_options={"include_usage": True})
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = stream_chunks(await resp.text())
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
        assert chunk["object"] == "chat.completion.chunk"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


async def test_streamed_text_equals_the_non_streamed_text(client: Any) -> None:
    """A character split over tokens (or chunks) would show as U+FFFD in one and not the other."""
    whole = await _chat(client, max_tokens=40)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=40, stream=True))
    chunks = stream_chunks(await resp.text())
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert all("usage" not in c for c in chunks)  # not asked for


async def test_stop_string_ends_the_choice_and_is_not_returned(client: Any) -> None:
    full = (await _chat(client, max_tokens=30))["choices"][0]["message"]["content"]
    stop = full[8:11]
    before = full[: full.index(stop)]
    body = await _chat(client, max_tokens=30, stop=[stop, "never-generated-xyz"])
    assert body["choices"][0]["message"]["content"] == before
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 30

    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=30, stop=stop, stream=True))
    chunks = stream_chunks(await resp.text())
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == before
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_n_returns_n_choices_and_sums_usage(client: Any) -> None:
    body = await _chat(client, n=3, max_tokens=6)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 18
    resp = await client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=4, stream=True))
    chunks = stream_chunks(await resp.text())
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1]


async def test_seed_makes_sampling_repeatable(client: Any) -> None:
    def sampled(seed: int) -> dict[str, Any]:
        return {"temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 20}

    first, second, other = await asyncio.gather(
        _chat(client, **sampled(7)), _chat(client, **sampled(7)), _chat(client, **sampled(8))
    )
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["choices"][0]["message"]["content"] != other["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"]


async def test_sampling_parameters_are_accepted(client: Any) -> None:
    body = await _chat(client, temperature=0.7, top_p=0.9, top_k=20, max_tokens=5, user="u-1")
    # Sampling may pick the end-of-sequence token early; otherwise the limit is reached exactly.
    choice = body["choices"][0]
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 5
    else:
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 5


async def test_without_max_tokens_generation_is_bounded_by_the_context(client: Any) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    result = await resp.json()
    assert result["usage"]["total_tokens"] <= 2048


async def test_a_model_without_a_chat_template_gets_the_phi3_style_one(
    make_client: Any, tmp_path: Path, tokenizer: Any
) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(BUNDLED_MODEL, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    client = await make_client(model_path=folder)
    resp = await client.post("/v1/chat/completions", json=chat_body(model="no-template"))
    assert resp.status == 200
    messages = [{"role": "user", "content": "Hello there"}]
    expected = _prompt_tokens(tokenizer, messages, FALLBACK_CHAT_TEMPLATE)
    assert (await resp.json())["usage"]["prompt_tokens"] == expected


async def test_an_error_after_the_stream_started_is_an_error_event_then_done(client: Any) -> None:
    from genai_server.errors import EngineFailure

    engine: Any = embedded_engine(client.app)  # its methods are replaced to inject faults
    real_generate = engine.generate

    async def failing_after_first_delta(prompt: list[int], options: Any, cache_scope: str = "") -> Any:
        stream = real_generate(prompt, options, cache_scope)
        yield await stream.__anext__()  # a real first delta, then the engine "fails"
        await stream.aclose()
        raise EngineFailure("the engine failed to generate a response")

    engine.generate = failing_after_first_delta  # fault injection around the real engine
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=50, stream=True))
    assert resp.status == 200
    events = (await resp.text()).strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])
    assert error["error"]["type"] == "server_error"
    assert error["error"]["code"] == "engine_error"
    engine.generate = real_generate
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


@pytest.mark.parametrize("extra", [{}, {"seed": 3}, {"stream": True}], ids=["engine", "seeded", "stream"])
async def test_top_k_1_is_greedy_whatever_the_temperature(client: Any, extra: dict[str, Any]) -> None:
    """Keeping only the most likely token is greedy decoding (vLLM treats it so); the engine refuses a temperature
    beside it, which was a 500."""
    greedy = await client.post("/v1/chat/completions", json=chat_body(max_tokens=12, temperature=0))
    expected = (await greedy.json())["choices"][0]["message"]["content"]
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=12, temperature=0.8, top_k=1, **extra))
    assert resp.status == 200, await resp.text()
    if extra.get("stream"):
        chunks = stream_chunks(await resp.text())
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    else:
        text = (await resp.json())["choices"][0]["message"]["content"]
    assert_same_greedy_text(text, expected)
