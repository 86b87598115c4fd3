"""``/tokenize`` and ``/detokenize`` in vLLM's and llama-server's shapes, on the embedded engine (its own tokenizer,
the chat template for messages) and relayed by the gateway; ``/v1/embeddings`` relayed, and refused by name on the
embedded engine, which has none to give."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.harness.bodies import MODEL_ID
from tests.harness.in_process import ClientFactory
from tests.harness.upstream import VLLM_ROUTES, ScriptedUpstream

TEXT = "Hello there, how are you?"
PROXIED = "proxied-model"


async def _post(client: TestClient[Any, Any], path: str, body: dict[str, Any], status: int = 200) -> Any:
    resp = await client.post(path, json=body)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_a_text_is_tokenized_as_the_models_tokenizer_does(client: TestClient[Any, Any], tokenizer: Any) -> None:
    expected = [int(t) for t in tokenizer.encode(TEXT)]
    vllm = await _post(client, "/tokenize", {"model": MODEL_ID, "prompt": TEXT, "return_token_strs": True})
    assert vllm["tokens"] == expected and vllm["count"] == len(expected) and vllm["max_model_len"] > 0
    assert "".join(vllm["token_strs"]) == TEXT  # each token's own text, joined
    llama = await _post(client, "/tokenize", {"content": TEXT})  # llama-server's shape, the first model's tokenizer
    assert llama["tokens"] == expected
    back = await _post(client, "/detokenize", {"model": MODEL_ID, "tokens": expected})
    assert back == {"prompt": TEXT, "content": TEXT}


async def test_messages_are_counted_as_the_chat_prompt_is(client: TestClient[Any, Any]) -> None:
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": TEXT}]
    counted = await _post(client, "/tokenize", {"model": MODEL_ID, "messages": messages})
    chat = await _post(client, "/v1/chat/completions", {"model": MODEL_ID, "messages": messages, "max_tokens": 1})
    assert counted["count"] == chat["usage"]["prompt_tokens"] == len(counted["tokens"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
        ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False}, None),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [2**31]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [1] * 100_000}, "tokens"),  # more than the context holds
    ],
)
async def test_bad_input_is_a_4xx_naming_the_parameter(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], param: str | None
) -> None:
    resp = await client.post(path, json=body)
    assert resp.status in (400, 404), await resp.text()
    error = (await resp.json())["error"]
    assert param is None or error["param"] == param


async def test_embeddings_on_the_embedded_engine_are_refused_by_name(client: TestClient[Any, Any]) -> None:
    error = (await _post(client, "/v1/embeddings", {"model": MODEL_ID, "input": "hi"}, status=400))["error"]
    assert error["code"] == "model_not_supported" and error["param"] == "model" and "no embeddings" in error["message"]


async def test_the_gateway_relays_tokenize_detokenize_and_embeddings(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, seen = scripted
    proxy = await make_client(backend="openai", upstream_url=url + "/v1", model_id=PROXIED, upstream_model="vllm")
    tokens = await _post(proxy, "/tokenize", {"model": PROXIED, "prompt": "Hello", "return_token_strs": True})
    assert tokens == VLLM_ROUTES["/tokenize"]  # beside the upstream's /v1, as vLLM serves it
    assert seen.bodies[-1] == {"model": "vllm", "prompt": "Hello", "return_token_strs": True}
    assert await _post(proxy, "/detokenize", {"model": PROXIED, "tokens": [1, 2]}) == {
        "prompt": "Hello",
        "content": "Hello",
    }
    resp = await proxy.post("/v1/embeddings", json={"model": PROXIED, "input": ["Hello"], "dimensions": 2})
    embedded = await resp.json()
    assert embedded["data"] == VLLM_ROUTES["/v1/embeddings"]["data"] and embedded["model"] == PROXIED
    assert seen.bodies[-1] == {"model": "vllm", "input": ["Hello"], "dimensions": 2}
    assert embedded["metrics"]["prompt_tokens"] == 2 and "x-total-time" in resp.headers


async def test_routes_that_only_tokenize_have_a_limit_of_their_own(make_client: ClientFactory) -> None:
    """As many at once as the engine's tokenizer threads, no queue here: a flood is refused with 429 rather than
    queued ahead of prompts on the tokenizer; generation slots are not theirs to take."""
    client = await make_client(max_queued_requests=0)
    text = "a long text to tokenize " * 600
    answers = await asyncio.gather(*(client.post("/tokenize", json={"prompt": text}) for _ in range(12)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses
    refused = next(answer for answer in answers if answer.status == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await client.post("/tokenize", json={"prompt": "and then"})).status == 200
