"""Outbox: the mailbox an EngineCore pushes one request's results into.

Invariant: `push` never blocks and never fails, so a slow or vanished consumer can never stall
the engine loop; the consumer takes everything ready in one `get`. What an outbox can hold is
bounded by the request itself (at most one delta per generated token per sample, plus one end).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Outbox(Generic[T]):
    def __init__(self) -> None:
        self._items: list[T] = []
        self._ready = trio.Event()

    def push(self, item: T) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> list[T]:
        """Wait until something is ready, then take all of it."""
        if not self._items:
            await self._ready.wait()
        items, self._items = self._items, []
        self._ready = trio.Event()
        return items
