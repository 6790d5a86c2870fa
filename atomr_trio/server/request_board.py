"""RequestBoard: the Gateway's list of its live Request actors, for `/admin/tree`.

Invariants:
- A request is on the board from the moment its handler admits work for a deployment until
  its admission ticket is released (the handler returns, or the stream that took the ticket
  over ends), so the board never shows a finished request nor misses a streaming one.
- Only the request's own handler adds and removes its entry; views read `snapshot()`, a tuple
  of frozen entries.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import trio


@dataclass(frozen=True)
class RequestEntry:
    key: int
    model: str
    since: float  # trio clock
    phase: str = "preparing"  # preparing -> admitted -> streaming


class RequestBoard:
    def __init__(self) -> None:
        self._entries: dict[int, RequestEntry] = {}
        self._keys = itertools.count()

    def add(self, model: str) -> int:
        key = next(self._keys)
        self._entries[key] = RequestEntry(key, model, trio.current_time())
        return key

    def mark(self, key: int, phase: str) -> None:
        if key in self._entries:
            self._entries[key] = replace(self._entries[key], phase=phase)

    def remove(self, key: int) -> None:
        self._entries.pop(key, None)

    def snapshot(self) -> tuple[RequestEntry, ...]:
        return tuple(self._entries.values())

    def node(self, draining: bool) -> dict[str, object]:
        """The Gateway's node of the actor tree, its live requests as children."""
        now = trio.current_time()
        return {"actor": "Gateway", "state": "draining" if draining else "serving",
                "requests": len(self._entries),
                "children": [{"actor": "Request", "model": e.model, "phase": e.phase,
                              "age_s": round(now - e.since, 3)} for e in self.snapshot()]}
