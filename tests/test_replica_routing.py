"""Cache-aware routing: a conversation's next turn goes to the replica that served its earlier turns (which holds
their KV cache), unless that replica is overloaded; what counts as the same conversation.

The replicas are scripted upstreams (``tests/harness/upstream.py``) that record every body posted to them; a message
starting with "hold" gets a stream that does not end until the client leaves, to keep a replica busy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from genai_server.backends.affinity import MIN_SHARE, MOST_TURNS, PrefixTable, conversation_prefixes
from tests.harness.in_process import ClientFactory, replicated_gateway
from tests.harness.responses import metric_sample
from tests.harness.upstream import USAGE, Endless, Reply, ScriptedUpstream, chunk, sse
from tests.harness.waiting import eventually_async

MODEL = "replicated"
Gateway = TestClient[web.Request, web.Application]
LISTING = {"object": "list", "data": []}
ANSWER = "Sure."
ANSWERED = Reply(sse(chunk(ANSWER, "stop"), USAGE))
HELD = Endless(sse(chunk("x"), done=False), interval=0.05)


class Replica(ScriptedUpstream):
    """A scripted replica that answers at once, or holds the stream open for a message starting with "hold"."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["messages"][-1]["content"].startswith("hold"):
            return await self._endless(request, HELD)
        return web.Response(body=ANSWERED.body, content_type=ANSWERED.content_type)

    def conversations(self) -> set[str]:
        """The first message of each conversation posted here: which conversations it served."""
        return {body["messages"][0]["content"] for body in self.bodies}


async def _replicas(aiohttp_server: Any, count: int = 3) -> list[tuple[Replica, str]]:
    made = []
    for _ in range(count):
        replica = Replica({}, listing=LISTING)
        server: TestServer = await aiohttp_server(replica.app())
        made.append((replica, str(server.make_url("/v1"))))
    return made


async def _gateway(make_client: ClientFactory, tmp_path: Path, urls: list[str], balance: str) -> Gateway:
    return await replicated_gateway(make_client, tmp_path, MODEL, urls, balance)


def _turn(history: list[dict[str, str]], question: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [*history, {"role": "user", "content": question}], "stream": True}


async def _converse(gateway: Gateway, opening: str, turns: int) -> None:
    """One conversation of ``turns`` turns, each repeating the history and its answer, as chat clients do."""
    history = [{"role": "system", "content": opening}]
    for turn in range(turns):
        question = f"question {turn} of a conversation that goes on"
        resp = await gateway.post("/v1/chat/completions", json=_turn(history, question))
        assert resp.status == 200, await resp.text()
        await resp.read()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]


async def test_each_turn_of_a_conversation_goes_to_the_replica_of_its_first(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Six conversations of four turns, by default (cache_aware): every conversation is served by one replica
    alone, and the turns after the first are counted as that replica's prefix hits. New conversations still spread
    (least in flight): more than one replica serves some."""
    replicas = await _replicas(aiohttp_server)
    gateway = await _gateway(make_client, tmp_path, [url for _, url in replicas], "cache_aware")
    openings = [f"You are assistant number {i}, who answers in full sentences." for i in range(6)]
    await asyncio.gather(*(_converse(gateway, opening, 4) for opening in openings))

    for opening in openings:
        served_by = [replica for replica, _ in replicas if opening in replica.conversations()]
        assert len(served_by) == 1, f"a conversation went to {len(served_by)} replicas"
    assert sum(len(replica.bodies) for replica, _ in replicas) == 6 * 4
    assert sum(1 for replica, _ in replicas if replica.bodies) > 1
    exposition = await (await gateway.get("/metrics")).text()
    hits = [
        metric_sample(exposition, "genai_server_upstream_replica_prefix_hits_total", model=MODEL, replica=url)
        for _, url in replicas
    ]
    assert sum(hits) == 6 * 3


async def test_an_overloaded_replica_is_passed_over_for_its_conversation(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A conversation's replica takes two of its requests at once (the least any replica may have), but not a third
    while the others have none: more than 1.25x the mean in flight. That one goes to another replica, counted as
    passed over."""
    replicas = await _replicas(aiohttp_server)
    gateway = await _gateway(make_client, tmp_path, [url for _, url in replicas], "cache_aware")
    history = [{"role": "system", "content": "A long conversation about the sea, the ships, and their sailors."}]
    await _converse(gateway, history[0]["content"], 1)
    [home] = [replica for replica, _ in replicas if replica.bodies]

    held = [await gateway.post("/v1/chat/completions", json=_turn(history, "hold on"))]
    await eventually_async(lambda: _started(home, 1), what="a held stream running on the conversation's replica")
    held.append(await gateway.post("/v1/chat/completions", json=_turn(history, "hold on, again")))
    await eventually_async(lambda: _started(home, 2), what="two held streams on the conversation's replica")
    held.append(await gateway.post("/v1/chat/completions", json=_turn(history, "hold this one too")))
    await eventually_async(
        lambda: _started_elsewhere(replicas, home), what="the third held stream running on another replica"
    )
    assert home.started == 2
    exposition = await (await gateway.get("/metrics")).text()
    home_url = next(url for replica, url in replicas if replica is home)
    passed = metric_sample(
        exposition, "genai_server_upstream_replica_prefix_passed_over_total", model=MODEL, replica=home_url
    )
    assert passed == 1
    for resp in held:
        resp.close()


async def test_a_continued_response_goes_to_the_replica_that_wrote_it(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Responses relayed as they are (native_apis): the replica that wrote a response keeps it, so a request
    continuing it (previous_response_id, streamed or not) and its GET go there, whatever else is in flight."""
    replicas = await _replicas(aiohttp_server)
    urls = [url for _, url in replicas]
    gateway = await replicated_gateway(
        make_client, tmp_path, MODEL, urls, "cache_aware", more='native_apis = ["responses"]\n'
    )
    first = await gateway.post("/v1/responses", json={"model": MODEL, "input": "Hello"})
    assert first.status == 200, await first.text()
    response_id = (await first.json())["id"]
    [writer] = [replica for replica, _ in replicas if replica.bodies]
    for stream in (False, True, False, True):
        body = {"model": MODEL, "input": "and then?", "previous_response_id": response_id, "stream": stream}
        resp = await gateway.post("/v1/responses", json=body)
        assert resp.status == 200, await resp.text()
        await resp.read()
    assert await (await gateway.get(f"/v1/responses/{response_id}")).json()
    assert len(writer.bodies) == 5 and writer.kept == [("GET", f"/v1/responses/{response_id}")]
    assert all(not replica.bodies for replica, _ in replicas if replica is not writer)


async def test_a_messages_conversation_relayed_as_it_is_stays_on_its_replica(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Anthropic's Messages API relayed as it is (native_apis), whole answers: each later turn of a conversation
    goes where its first went, as a streamed one does."""
    replicas = await _replicas(aiohttp_server)
    urls = [url for _, url in replicas]
    gateway = await replicated_gateway(
        make_client, tmp_path, MODEL, urls, "cache_aware", more='native_apis = ["messages"]\n'
    )
    system = "You answer questions about lighthouses, their keepers and the ships they guide home."
    history = [{"role": "user", "content": "Which is the oldest lighthouse still in use?"}]
    for question in ("And the tallest?", "Who keeps it?", "Since when?", "Thank you."):
        body = {"model": MODEL, "max_tokens": 16, "system": system, "messages": history}
        resp = await gateway.post("/v1/messages", json=body)
        assert resp.status == 200, await resp.text()
        history = [*history, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": question}]
    assert sorted(len(replica.bodies) for replica, _ in replicas) == [0, 0, 4]


async def _started(replica: Replica, count: int) -> bool:
    return replica.started >= count


async def _started_elsewhere(replicas: list[tuple[Replica, str]], home: Replica) -> bool:
    return any(replica.started for replica, _ in replicas if replica is not home)


async def test_least_in_flight_still_scatters_conversations(
    make_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The policy it replaces, still chosen by ``balance``: with nothing in flight, each turn goes to any replica,
    so some conversation of six ends up on more than one (the test above fails the same way without cache_aware)."""
    replicas = await _replicas(aiohttp_server)
    gateway = await _gateway(make_client, tmp_path, [url for _, url in replicas], "least_in_flight")
    openings = [f"You are assistant number {i}, who answers in full sentences." for i in range(6)]
    for opening in openings:
        await _converse(gateway, opening, 4)
    spread = [sum(1 for replica, _ in replicas if opening in replica.conversations()) for opening in openings]
    assert max(spread) > 1


def _chat(*contents: str, **extra: Any) -> dict[str, Any]:
    roles = ["system", *(("user", "assistant")[i % 2] for i in range(len(contents) - 1))]
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)], **extra}


def test_a_continued_conversation_finds_its_replica_and_a_shared_opening_alone_does_not() -> None:
    """The longest known prefix names the replica, whatever order a client writes a message's keys in; a prefix
    covering less than half of the prompt (a system prompt every conversation shares) names none."""
    table: PrefixTable[str] = PrefixTable()
    first = conversation_prefixes(_chat("Be brief.", "What is the tallest mountain on Earth and how tall is it?"))
    assert first is not None
    table.remember(first, "a")
    continued = _chat(
        "Be brief.", "What is the tallest mountain on Earth and how tall is it?", "Everest, 8849 m.", "And K2?"
    )
    reordered = {"messages": [{"content": m["content"], "role": m["role"]} for m in continued["messages"]]}
    for body in (continued, reordered):
        prefixes = conversation_prefixes(body)
        assert prefixes is not None and table.holder(prefixes) == "a"

    other = conversation_prefixes(_chat("Be brief.", "Tell me about the history of the Roman empire, please."))
    assert other is not None and other.sizes[0] < MIN_SHARE * other.total
    assert table.holder(other) is None


def test_a_long_answer_does_not_hide_the_conversation() -> None:
    """The turn after a long answer: the prefix the replica served before the answer is short beside it, but the
    replica wrote the answer too, so the match covers both."""
    table: PrefixTable[str] = PrefixTable()
    first = conversation_prefixes(_chat("Be brief.", "Write me a poem."))
    assert first is not None
    table.remember(first, "a")
    second = conversation_prefixes(_chat("Be brief.", "Write me a poem.", "A long poem. " * 200, "Another?"))
    assert second is not None and second.sizes[1] < MIN_SHARE * second.total
    assert table.holder(second) == "a"


def test_one_request_leaves_a_few_keys_and_a_huge_one_none() -> None:
    """However many messages a request has, it leaves at most three keys (its first prefix and its last two), and
    a body of more turns than any conversation has is not followed at all: no client can flush the table."""
    table: PrefixTable[str] = PrefixTable()
    many = conversation_prefixes(_chat(*(f"message {i}" for i in range(500))))
    assert many is not None
    table.remember(many, "a")
    assert len(table) == 3
    assert conversation_prefixes(_chat(*("x" for _ in range(MOST_TURNS + 1)))) is None


def test_tools_salt_and_instructions_make_another_conversation() -> None:
    """What an engine renders before the messages is part of the prefix: the same messages with other tools, another
    cache_salt or other instructions (Responses) are not the same conversation."""
    table: PrefixTable[str] = PrefixTable()
    base = _chat("Be brief.", "What is the tallest mountain on Earth and how tall is it?")
    prefixes = conversation_prefixes(base)
    assert prefixes is not None
    table.remember(prefixes, "a")
    for changed in (
        {**base, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {**base, "cache_salt": "tenant-2"},
        {**base, "instructions": "Answer in French."},
    ):
        other = conversation_prefixes(changed)
        assert other is not None and table.holder(other) is None
    responses = conversation_prefixes({"input": "A question asked as a string."})
    assert responses is not None and len(responses.keys) == 1
    assert conversation_prefixes({"prompt": "a text completion"}) is None
    assert conversation_prefixes({"messages": []}) is None


def test_the_table_forgets_the_least_recently_used_beyond_its_size() -> None:
    table: PrefixTable[str] = PrefixTable(entries=4)
    bodies = [_chat(f"conversation {i}", f"a question long enough to matter, number {i}") for i in range(3)]
    for i, body in enumerate(bodies):
        prefixes = conversation_prefixes(body)
        assert prefixes is not None
        table.remember(prefixes, str(i))
    assert len(table) == 4
    oldest, newest = conversation_prefixes(bodies[0]), conversation_prefixes(bodies[2])
    assert oldest is not None and newest is not None
    assert table.holder(oldest) is None and table.holder(newest) == "2"
