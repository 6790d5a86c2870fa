"""Tickets and admissions: what a Deployment answers a request it admits — the replica's
EngineHandle and a `Ticket`, the request's place in the deployment until it is released.

Invariants:
- A ticket is released once, whatever releases it (`release()` or leaving `with ticket:`; later
  calls do nothing), and releasing never blocks: it is a message on the deployment's release
  channel, which is unbounded by construction — each ticket sends at most one message, so the
  channel never holds more than the tickets out — and so a release is never lost to a full inbox.
- A release after the deployment has stopped is moot and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import trio

from ..engine.engine_core import EngineHandle

# One prompt of a request: (prompt tokens, n, max_tokens), as the Deployment checks them.
Job = tuple[int, int, int | None]


class Ticket:
    def __init__(self, releases: trio.MemorySendChannel[int]) -> None:
        self._releases: trio.MemorySendChannel[int] | None = releases

    def release(self) -> None:
        releases, self._releases = self._releases, None
        if releases is None:
            return
        try:
            releases.send_nowait(1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the deployment has stopped: nothing to count any more

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@dataclass(frozen=True)
class Admission:
    """An admitted request: run it on `engine`, release `ticket` once its last event is out."""

    engine: EngineHandle
    ticket: Ticket
