"""The responses kept for ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}``: in this process's
memory only (a restart forgets them), bounded in count and bytes with the least recently used going first, and each
visible only to the API key that created it (to any other it does not exist).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class StoredResponse:
    """A finished response, and the conversation a next turn continues: its history and input as chat messages,
    its answer last (instructions left out: a next turn brings its own)."""

    owner: str
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    size: int
    # A response an engine made and keeps itself (relayed as it is): the model whose engine has it; this store
    # keeps only that it exists and whose it is.
    relayed_to: str | None = None


class ResponseStore:
    """At most ``max_items`` responses holding at most ``max_bytes`` (as JSON) together."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def put(self, owner: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """Keep a response, making room by dropping the least recently used; False when it cannot be kept at all
        (the store is off, or it alone is larger than the store)."""
        try:
            size = len(orjson.dumps(response)) + len(orjson.dumps(conversation))
        except orjson.JSONEncodeError:  # not JSON this store could write back: not kept (GET would fail)
            return False
        return self._keep(StoredResponse(owner, response, conversation, size))

    def _keep(self, stored: StoredResponse) -> bool:
        if self._max_items == 0 or stored.size > self._max_bytes:
            return False
        response_id = stored.response["id"]
        held = self._items.get(response_id)
        if held is not None and held.owner != stored.owner:
            return False  # an engine's id that another key's response has: never taken over
        self._drop(response_id)
        while self._items and (len(self._items) >= self._max_items or self._bytes + stored.size > self._max_bytes):
            self._drop(next(iter(self._items)))
        self._items[response_id] = stored
        self._bytes += stored.size
        return True

    def remember(self, owner: str, response_id: str, model: str) -> None:
        """Note a response an engine keeps (``relayed_to``): whose it is, for its ``GET``, ``DELETE`` and
        ``previous_response_id``; bounded with the rest."""
        self._keep(StoredResponse(owner, {"id": response_id}, [], len(response_id) + len(model), model))

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if it is kept and ``owner``'s; reading it makes it the most recently used."""
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            return None
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: str) -> bool:
        """Forget the response; False if ``owner`` has none of that id."""
        if self.get(response_id, owner) is None:
            return False
        self._drop(response_id)
        return True

    @property
    def size(self) -> tuple[int, int]:
        """Responses kept, and their bytes."""
        return len(self._items), self._bytes

    def _drop(self, response_id: str) -> None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size
