"""Messages between a request's owner and an EngineCore (all frozen dataclasses), and `reply`,
how every actor answers a request-reply message.

Invariants: the engine answers an `AddRequest` only through its outbox, and an owner may send
`AbortRequest` any number of times, before, during or after the request finishes. An actor's
answer to a caller that has gone away (cancelled: its reply channel closed) is dropped; it never
fails the actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from ..executor.sampler import TokenLogprobs
from ..sampling_params import SamplingParams
from .outbox import Outbox

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

T = TypeVar("T")


def reply(channel: trio.MemorySendChannel[T], value: T) -> bool:
    """Answer on a one-shot reply channel; False when the caller stopped waiting."""
    try:
        channel.send_nowait(value)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        return False
    return True


class Board(Generic[T]):
    """Where an actor publishes its latest snapshot (a frozen dataclass) for its handles to read.
    Only the owning actor calls `publish`; a read never blocks and sees a whole snapshot."""

    def __init__(self, first: T) -> None:
        self._value = first

    def publish(self, value: T) -> None:
        self._value = value

    def read(self) -> T:
        return self._value


@dataclass(frozen=True)
class RequestMetrics:
    """When things happened to a sample, on the engine's monotonic clock (seconds)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float
    num_generation_tokens: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.first_token_time is None or self.num_generation_tokens < 2:
            return None
        return (self.num_generation_tokens - 1) / max(self.finished_time - self.first_token_time, 1e-9)


@dataclass(frozen=True)
class SeqDelta:
    """What one step produced for one sample of a request."""

    index: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: RequestMetrics | None = None  # on the final delta of a sample
    # sample 0 only, once, with the delta that ends the prompt: entries of prompt positions 1..
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outbox: Outbox[SeqDelta]
    grammar: CompiledGrammar | None = None  # params.structured_outputs, compiled (Request.prepare)


@dataclass(frozen=True)
class AbortAll:
    """End every live request ("abort"): the server is shutting down."""


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    index: int | None = None  # one sample only (a stop string ended it); None: the whole request
    # The owner's outbox: only the request that reports to it is aborted, so an owner whose
    # AddRequest was refused (its id already in use) cannot abort the request holding that id.
    outbox: Outbox[SeqDelta] | None = None
