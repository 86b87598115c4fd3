"""Which replica holds a conversation's KV cache: a bounded table from a conversation's prefixes to the replica
that last served them, for the ``cache_aware`` balance (``replicas.py``).

A conversation's next turn repeats its history and adds to it, so the replica that served the last turn holds most
of the new prompt's KV cache, and prefills only the rest (80x faster for a chat's fifth turn on our engine). Token
indices cannot be known here (every engine tokenizes and templates its own way), so the prefixes are the request's
own: its messages (chat, Ollama), or its input items (Responses), each prefix hashed as a chain so that a prefix of
one request finds the same key as the whole of an earlier one. The seed of the chain is what an engine renders
before the messages (tools, instructions, Anthropic's system) and ``cache_salt``, which keeps caches apart.

A match counts only when it covers at least ``MIN_SHARE`` of the new prompt's characters: a short system prompt
that every conversation shares must not send them all to one replica (SGLang's cache-aware router has the same
threshold, 0.5, as its default). The model's own turns right after a matched prefix count as matched: the replica
that served that prefix generated them, so it holds them too (and a long answer would otherwise hide the match).

Bounded per request: a body of more than ``MOST_TURNS`` turns is not followed, and a request leaves at most
``KEYS_KEPT`` keys in the table (its first prefix, a shared document, and its last ones, which the next turn
repeats), so that no client can flush the table or hold the event loop with one huge body.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

# Share of a prompt's characters the longest known prefix must cover for the replica that served it to be asked.
MIN_SHARE = 0.5
# Prefixes remembered (each a 16-byte key): about 100 bytes each, so a few MB at most.
TABLE_ENTRIES = 32_768
# What an engine renders before the messages, when a request carries it: part of every prefix.
_SEED_FIELDS = ("tools", "instructions", "system", "cache_salt")
# Turns of a body that is followed at all; keys of one request that the table keeps.
MOST_TURNS = 1024
KEYS_KEPT = 3
# What the model itself wrote: a chat message's role, a Responses item's type.
_MODEL_ROLES = frozenset({"assistant"})
_MODEL_ITEMS = frozenset({"function_call", "reasoning", "custom_tool_call"})

R = TypeVar("R")


@dataclass(frozen=True)
class Prefixes:
    """A request's prefixes, shortest first: the key of each, the characters it covers, and whether the turn that
    ends it is the model's own (an answer, a tool call)."""

    keys: tuple[bytes, ...]
    sizes: tuple[int, ...]
    answers: tuple[bool, ...]
    # The response a Responses request continues (previous_response_id): the replica that wrote it keeps it, and
    # alone can answer for it.
    continues: bytes | None = None

    @property
    def total(self) -> int:
        """The whole prompt's characters."""
        return self.sizes[-1] if self.sizes else 0


def conversation_prefixes(body: dict[str, Any]) -> Prefixes | None:
    """The prefixes of a chat (``messages``) or Responses (``input``) request body; None for anything else (a text
    completion's prompt has no turns to cut at)."""
    turns = body.get("messages", body.get("input"))
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns or len(turns) > MOST_TURNS:
        return None
    previous = body.get("previous_response_id")
    continues = response_key(previous) if isinstance(previous, str) else None
    seed = {k: body[k] for k in (*_SEED_FIELDS, "previous_response_id") if k in body}
    chain = hashlib.blake2b(_canonical(seed), digest_size=16)
    keys, sizes, answers, size = [], [], [], 0
    for turn in turns:
        text = _canonical(turn)
        chain.update(text)
        keys.append(chain.copy().digest())
        size += len(text)
        sizes.append(size)
        answers.append(_the_models(turn))
    return Prefixes(tuple(keys), tuple(sizes), tuple(answers), continues)


def kept_response(response_id: str) -> Prefixes:
    """What a request for a kept response (its GET or DELETE) follows: the replica that wrote it."""
    return Prefixes((), (), (), response_key(response_id))


def response_key(response_id: str) -> bytes:
    """The key of a response a replica wrote (and keeps, for previous_response_id and its GET and DELETE)."""
    return hashlib.blake2b(b"response:" + _canonical(response_id), digest_size=16).digest()


class PrefixTable(Generic[R]):
    """The replica that last served each prefix, least recently used forgotten first."""

    def __init__(self, entries: int = TABLE_ENTRIES) -> None:
        self._entries = entries
        self._holders: OrderedDict[bytes, R] = OrderedDict()

    def holder(self, prefixes: Prefixes) -> R | None:
        """The replica that served the longest of ``prefixes`` it knows, if that prefix and the model's own turns
        right after it cover ``MIN_SHARE`` of the prompt."""
        covered = prefixes.total  # the longest prefix, with the model's turns that follow it
        for i in reversed(range(len(prefixes.keys))):
            if covered < MIN_SHARE * prefixes.total:
                return None
            replica = self._holders.get(prefixes.keys[i])
            if replica is not None:
                self._holders.move_to_end(prefixes.keys[i])
                return replica
            if not prefixes.answers[i]:  # a turn the model did not write: the prefix before it covers less
                covered = prefixes.sizes[i - 1] if i else 0
        return None

    def writer(self, prefixes: Prefixes) -> R | None:
        """The replica that wrote the response ``prefixes`` continue, if it is known."""
        return None if prefixes.continues is None else self._holders.get(prefixes.continues)

    def remember(self, prefixes: Prefixes, replica: R) -> None:
        """``replica`` takes the request: it will hold its prefixes. The first (a document, a system prompt others
        share) and the last ones (which the next turn repeats) are kept."""
        keys = prefixes.keys
        for key in (*keys[:1], *keys[1:][-(KEYS_KEPT - 1) :]):
            self._holders[key] = replica
            self._holders.move_to_end(key)
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        while len(self._holders) > self._entries:
            self._holders.popitem(last=False)

    def remember_key(self, key: bytes, replica: R) -> None:
        """``replica`` holds what ``key`` names (a response it wrote)."""
        self._holders[key] = replica
        self._holders.move_to_end(key)
        self._forget_oldest()

    def __len__(self) -> int:
        return len(self._holders)


def _the_models(turn: Any) -> bool:
    """Whether a turn is one the model wrote (an answer, a tool call), which the replica that served the turns
    before it generated and so holds."""
    if not isinstance(turn, dict):
        return False
    return turn.get("role") in _MODEL_ROLES or turn.get("type") in _MODEL_ITEMS


def _canonical(value: Any) -> bytes:
    """One spelling of a JSON value, whatever order its client wrote its keys in."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate a client escaped in its JSON is still a key
