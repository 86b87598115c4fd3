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
threshold, 0.5, as its default).
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

R = TypeVar("R")


@dataclass(frozen=True)
class Prefixes:
    """A request's prefixes, shortest first: the key of each and the characters it covers."""

    keys: tuple[bytes, ...]
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        """The whole prompt's characters."""
        return self.sizes[-1]


def conversation_prefixes(body: dict[str, Any]) -> Prefixes | None:
    """The prefixes of a chat (``messages``) or Responses (``input``) request body; None for anything else (a text
    completion's prompt has no turns to cut at)."""
    turns = body.get("messages", body.get("input"))
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        return None
    chain = hashlib.blake2b(_canonical({k: body[k] for k in _SEED_FIELDS if k in body}), digest_size=16)
    keys, sizes, size = [], [], 0
    for turn in turns:
        text = _canonical(turn)
        chain.update(text)
        keys.append(chain.copy().digest())
        size += len(text)
        sizes.append(size)
    return Prefixes(tuple(keys), tuple(sizes))


class PrefixTable(Generic[R]):
    """The replica that last served each prefix, least recently used forgotten first."""

    def __init__(self, entries: int = TABLE_ENTRIES) -> None:
        self._entries = entries
        self._holders: OrderedDict[bytes, R] = OrderedDict()

    def holder(self, prefixes: Prefixes) -> R | None:
        """The replica that served the longest of ``prefixes`` it knows, if that covers ``MIN_SHARE`` of the
        prompt."""
        for key, size in zip(reversed(prefixes.keys), reversed(prefixes.sizes), strict=True):
            if size < MIN_SHARE * prefixes.total:
                return None
            replica = self._holders.get(key)
            if replica is not None:
                self._holders.move_to_end(key)
                return replica
        return None

    def remember(self, prefixes: Prefixes, replica: R) -> None:
        """``replica`` takes the request: it will hold every one of its prefixes."""
        for key in prefixes.keys:
            self._holders[key] = replica
            self._holders.move_to_end(key)
        while len(self._holders) > self._entries:
            self._holders.popitem(last=False)

    def __len__(self) -> int:
        return len(self._holders)


def _canonical(value: Any) -> bytes:
    """One spelling of a JSON value, whatever order its client wrote its keys in."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate a client escaped in its JSON is still a key
