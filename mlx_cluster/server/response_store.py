"""Rank 0's bounded store of Responses API results: `previous_response_id` and GET /v1/responses/{id}.

In memory, oldest first: a size bound (`server.responses_store_max`) evicts the oldest response
and a time to live (`server.responses_store_ttl_s`, from when it was stored) expires it. It is touched only on the HTTP (asyncio) thread, so it needs
no lock. Stored responses do not survive a restart, as documented.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class StoredResponse:
    response: dict  # the Response object as returned to the client
    history: list[dict]  # the conversation as chat messages, without instructions (they do not carry over)
    stored_at: float = field(default_factory=time.monotonic)


class ResponseStore:
    def __init__(self, max_items: int, ttl_s: float, clock=time.monotonic):
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, response: dict, history: list[dict]) -> None:
        if self.max_items <= 0:
            return
        self._items.pop(response_id, None)
        self._items[response_id] = StoredResponse(response, history, self.clock())
        self._expire()
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if oldest.stored_at >= cutoff:
                return
            del self._items[key]
