"""Request/reply between the runtime's actors: `ask` sends a message that carries a one-shot
reply channel and awaits the answer; `refuse_pending` closes the reply channels of the messages
still in an inbox when its actor ends.

Invariants:
- A caller of `ask` gets the answer or `ActorGone`; it never waits on an actor that has ended
  (the actor's inbox is closed, or `refuse_pending` closed the message's reply channel).
- An answer the caller can no longer take (it was cancelled after the actor replied) goes to
  `on_lost`, so a resource in it (an admission ticket) is given back, never leaked; when the
  caller left before the answer, the actor's `reply` fails and the actor takes it back itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
M = TypeVar("M")


class ActorGone(Exception):
    """The actor asked has stopped: its inbox is closed, or it ended before answering."""


async def ask(inbox: trio.MemorySendChannel[M], make: Callable[[trio.MemorySendChannel[T]], M],
              on_lost: Callable[[T], None] | None = None) -> T:
    """Send `make(reply_channel)` and return the answer."""
    out, answer = trio.open_memory_channel[T](1)
    try:
        try:
            await inbox.send(make(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorGone from None
        try:
            return await answer.receive()
        except trio.EndOfChannel:
            raise ActorGone from None
        except BaseException:
            try:  # cancelled: the answer may already be in the channel
                late = answer.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                pass
            else:
                if on_lost is not None:
                    on_lost(late)
            raise
    finally:
        answer.close()  # from now on the actor's `reply` fails, and the actor undoes its answer
        out.close()


def refuse_pending(inbox: trio.MemoryReceiveChannel[Any]) -> None:
    """Close the reply channel of every message left in an ending actor's inbox (their callers
    get ActorGone instead of waiting forever)."""
    while True:
        try:
            msg = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        channel = getattr(msg, "reply", None)
        if isinstance(channel, trio.MemorySendChannel):
            channel.close()
