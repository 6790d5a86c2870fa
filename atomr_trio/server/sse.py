"""The one SSE writer of the gateway's streams (chat and completions alike), and the response
body that carries it.

Invariants:
- A stream's events are: each part's opening chunks, a chunk per delta that says something,
  then — however the requests end — an error event if the engine failed one or the deadline
  passed, the usage chunk when asked for, and `data: [DONE]`. Only the choices inside the
  chunks differ between kinds (`Choices`, built in chunks.py).
- The stream's outcome is counted once: by the writer when it reaches its end, else
  ("disconnected") by the body when it is closed or dropped.
- What the stream owns (its admission ticket) is released exactly once, by `SSEBody`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from quart import Response

from ..outputs import CompletionOutput, RequestError, RequestOutput
from ..request import DeadlineExceeded, Request
from .errors import stream_error, timeout_error
from .openai_format import usage, usage_so_far
from .outcome import Outcome
from .protocol import StreamOptions

if TYPE_CHECKING:
    from ..engine.engine_core import EngineHandle


class Choices(Protocol):
    """How one engine request of a stream becomes the choices of its chunks."""

    def opening(self) -> list[list[dict[str, Any]]]:
        """Chunks sent before the first delta: a list of choices per group of events sent at once."""
        ...

    def choice(self, delta: RequestOutput, o: CompletionOutput) -> dict[str, Any] | None:
        """The choice for `o`, one sample's part of `delta`; None when it has nothing to say."""
        ...


@dataclass(frozen=True)
class Part:
    """One engine request of a stream (a chat has one, a completion one per prompt)."""

    request: Request
    choices: Choices


def event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(rid: str, kind: str, model: str, engine: EngineHandle, parts: Sequence[Part], outcome: Outcome,
                     deadline: float, options: StreamOptions | None) -> AsyncGenerator[str, None]:
    """The events of a stream whose chunks are `kind` ("chat.completion.chunk", "text_completion");
    the parts run on `engine` one after the other, all by `deadline`."""
    head = {"id": rid, "object": kind, "created": int(time.time()), "model": model}
    last: dict[int, RequestOutput] = {}  # each part's latest delta
    generated = 0
    try:
        for i, part in enumerate(parts):
            so_far = usage_so_far(bool(options and options.continuous_usage_stats), len(part.request.prompt_ids))
            for group in part.choices.opening():
                yield "".join(event({**head, "choices": [c], **so_far(0)}) for c in group)
            done = [0] * part.request.params.n  # tokens generated per choice
            async with aclosing(part.request.outputs(engine, delta=True, deadline=deadline)) as deltas:
                async for delta in deltas:
                    last[i] = delta
                    generated += sum(len(o.token_ids) for o in delta.outputs)
                    events = []
                    for o in delta.outputs:
                        done[o.index] += len(o.token_ids)
                        choice = part.choices.choice(delta, o)
                        if choice is not None:
                            events.append(event({**head, "choices": [choice], **so_far(done[o.index])}))
                    if events:
                        yield "".join(events)
    except RequestError as e:
        outcome("engine_error")
        yield event(stream_error(e))
    except DeadlineExceeded:
        outcome("timeout")
        yield event(timeout_error().body())
    finals = list(last.values())
    outcome.ended(finals)
    if finals and options and options.include_usage:
        yield event({**head, "choices": [], "usage": usage(finals, generated)})
    yield "data: [DONE]\n\n"


class SSEBody:
    """A stream's response body: its events, encoded, and what the stream owns (`owned`, closed
    exactly once). It closes `owned` when the events end (or fail), and when the server closes
    the body (Quart does, also for a client gone mid-stream).

    A body never started is closed when it is dropped (`__del__`): when the client leaves before
    the response goes out, the server neither iterates nor closes the body, and nothing else
    will ever run for it; CPython drops it with the response, at once. Closing `owned` is plain
    synchronous bookkeeping (no engine request exists yet: the events have not begun), so it is
    safe there. A started body never relies on this: its events may have to abort an engine
    request, which awaits, and that runs in the task that iterates or closes it."""

    def __init__(self, events: AsyncGenerator[str, None], owned: ExitStack) -> None:
        self._events = events
        self._owned = owned
        self._started = False

    def __aiter__(self) -> SSEBody:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        try:
            return (await self._events.__anext__()).encode()
        except BaseException:  # the end (StopAsyncIteration), an error, or a cancelled client
            self._owned.close()
            raise

    async def aclose(self) -> None:
        self._started = True
        try:
            await self._events.aclose()
        finally:
            self._owned.close()

    def __del__(self) -> None:
        if not self._started:
            self._owned.close()


def sse_response(events: AsyncGenerator[str, None], owned: ExitStack, outcome: Outcome) -> Response:
    """The response of a stream, which takes over `owned`; a stream that ends before its
    writer counted an outcome lost its client."""
    owned.callback(outcome, "disconnected")
    return Response(SSEBody(events, owned), content_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
