"""Reasoning models on the embedded engine: a chat template that opens a thinking section makes the answer's thinking
``reasoning_content`` (and ``reasoning``) in chat, a reasoning item in Responses and a thinking block in Messages;
``chat_template_kwargs.enable_thinking: false`` closes the section as Qwen3's template does. The models are the
bundled one with a reasoning model's template (its random weights never close the section on their own, so all they
write is thinking); how text is split at the tags, whatever pieces it comes in, is checked on the splitter itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from genai_server.backends.reasoning import EMPTY_SECTION, ReasoningSplitter
from genai_server.settings import BUNDLED_MODEL
from tests.harness.in_process import ClientFactory
from tests.harness.responses import named_events, stream_chunks

# DeepSeek-R1's way: the generation prompt opens the section (an earlier turn's thinking ends at </think>).
OPENING_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""
# Qwen3's way: the model opens the section itself, unless enable_thinking is false.
QWEN3_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""
MODEL = "thinker"
HELLO = [{"role": "user", "content": "Hello"}]


def _model(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


async def _thinker(make_client: ClientFactory, tmp_path: Path, template: str = OPENING_TEMPLATE) -> Any:
    return await make_client(model_path=_model(tmp_path, template), model_id=MODEL)


async def _chat(client: TestClient[Any, Any], **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0, **extra}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def test_thinking_is_reasoning_content_in_chat_whole_and_streamed(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await _thinker(make_client, tmp_path)
    message = (await _chat(client))["choices"][0]["message"]
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert not message["content"]  # the random weights never closed the section: all of it was thinking
    streamed = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True},
    )
    deltas = [c["choices"][0]["delta"] for c in stream_chunks(await streamed.text()) if c["choices"]]
    assert deltas[0]["role"] == "assistant" and "reasoning_content" in deltas[0]  # thinking is the first token
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


async def test_thinking_is_a_reasoning_item_and_a_thinking_block(make_client: ClientFactory, tmp_path: Path) -> None:
    client = await _thinker(make_client, tmp_path)
    thought = (await _chat(client))["choices"][0]["message"]["reasoning_content"]
    response = await (
        await client.post(
            "/v1/responses", json={"model": MODEL, "input": "Hello", "max_output_tokens": 12, "temperature": 0}
        )
    ).json()
    assert response["output"][0]["type"] == "reasoning"
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": thought}]
    events = named_events(
        await (
            await client.post(
                "/v1/messages",
                json={"model": MODEL, "max_tokens": 12, "messages": HELLO, "temperature": 0, "stream": True},
            )
        ).text()
    )
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(deltas) == thought


async def test_enable_thinking_false_closes_the_section_as_qwen3s_template_does(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await _thinker(make_client, tmp_path, QWEN3_TEMPLATE)
    closed = await _chat(client, chat_template_kwargs={"enable_thinking": False})
    opened = await _chat(client)
    section = await (await client.post("/tokenize", json={"model": MODEL, "prompt": EMPTY_SECTION})).json()
    assert closed["usage"]["prompt_tokens"] == opened["usage"]["prompt_tokens"] + section["count"]
    assert "reasoning_content" not in closed["choices"][0]["message"]


@pytest.mark.parametrize(
    ("pieces", "opened", "expected"),
    [
        (["<think>", "I wonder", "</think>", "Hi"], False, ("I wonder", "Hi")),
        (["  <thi", "nk>\nwhy", " not</th", "ink>\n\nYes"], False, ("why not", "Yes")),
        (["Just", " an answer <think>"], False, ("", "Just an answer <think>")),
        (["thinking", " on</", "think>done"], True, ("thinking on", "done")),
        (["cut short </thi"], True, ("cut short </thi", "")),
        (["  "], False, ("", "  ")),
    ],
)
def test_the_splitter_finds_the_tags_in_any_pieces(pieces: list[str], opened: bool, expected: tuple[str, str]) -> None:
    splitter = ReasoningSplitter(opened=opened)
    parts = [splitter.feed(piece) for piece in pieces] + [splitter.flush()]
    assert ("".join(r for r, _ in parts), "".join(a for _, a in parts)) == expected
