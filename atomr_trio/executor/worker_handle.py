"""What an EngineCore holds of its Worker: the messages it may send (frozen dataclasses), the
`WorkerHandle` that sends them and awaits each answer on a one-shot channel, and the
`WorkerSnapshot` the Worker publishes.

Invariants: every message carries its own reply channel and gets exactly one answer, or, when
the Worker has stopped, none: its reply channel is closed and the handle raises WorkerStopped.
An answer that is an exception (`outcome.Error`) is raised in the caller, as if the caller had
run the job itself. Steps are answered in the order they were submitted; `submit` returns once
the Worker has the step, so the engine can submit the next one while it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import outcome
import trio

from ..engine.messages import Board
from .model_runner import StepBatch, StepResult

T = TypeVar("T")


class WorkerStopped(RuntimeError):
    """The Worker has stopped (its EngineCore is ending); it answers nothing any more."""


class PredecessorFailed(RuntimeError):
    """A step that follows another (its PLACEHOLDERs are that step's sampled tokens) was not run
    because that step failed."""


class PendingStep:
    """A submitted step's answer, to be awaited once."""

    def __init__(self, name: str, recv: trio.MemoryReceiveChannel[outcome.Outcome[StepResult]]) -> None:
        self._name = name
        self._recv = recv

    async def result(self) -> StepResult:
        """The step's result; the step's own exception is raised here."""
        async with self._recv:
            try:
                answer = await self._recv.receive()
            except trio.EndOfChannel:
                raise WorkerStopped(f"{self._name} stopped before answering") from None
        return answer.unwrap()


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the Worker shows of itself to the views (/admin/tree)."""

    name: str
    device: str
    state: str  # "starting" | "ready" | "rebuilding" | "failed" | "stopped"
    context_builds: int
    inbox_depth: int
    kernels: str  # which kernel path each part of the forward runs on (cpu_kernels.py)
    num_kv_blocks: int | None = None  # the Context's KV cache, once built (CUDA: sized from the GPU's memory)
    memory_bytes: int | None = None  # what the Context holds on its device (weights + KV cache), once built


@dataclass(frozen=True)
class Execute:
    """Run one engine step on the Context."""

    batch: StepBatch
    reply: trio.MemorySendChannel[outcome.Outcome[StepResult]]


@dataclass(frozen=True)
class CheckHealth:
    """After a failed step: can the Context still compute? (False: rebuild it.)"""

    reply: trio.MemorySendChannel[bool]


@dataclass(frozen=True)
class Rebuild:
    """Drop the Context and build a new one, if the restart budget allows (answer: whether it did)."""

    reply: trio.MemorySendChannel[outcome.Outcome[bool]]


WorkerMessage = Execute | CheckHealth | Rebuild


class WorkerHandle:
    """Messages to one Worker, and its latest snapshot. Only its EngineCore holds one."""

    def __init__(self, name: str, send: trio.MemorySendChannel[WorkerMessage],
                 board: Board[WorkerSnapshot]) -> None:
        self.name = name
        self._send = send
        self._board = board

    async def execute(self, batch: StepBatch) -> StepResult:
        """The step's result; the step's own exception is raised here."""
        return await (await self.submit(batch)).result()

    async def submit(self, batch: StepBatch) -> PendingStep:
        """Hand the Worker a step and return without waiting for it to run."""
        send, recv = trio.open_memory_channel[outcome.Outcome[StepResult]](1)
        try:
            await self._send.send(Execute(batch, send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            recv.close()
            raise WorkerStopped(f"{self.name} has stopped") from None
        return PendingStep(self.name, recv)

    async def healthy(self) -> bool:
        """After a failed step: False when the Context itself is at fault (rebuild it), True when
        the failure must have come from the batch's contents."""
        try:
            return await self._ask(CheckHealth)
        except WorkerStopped:
            return False

    async def restart(self) -> bool:
        """Rebuild a failed Context; False (and nothing rebuilt) once the restart budget is spent.
        A Context that fails to build raises here."""
        try:
            return (await self._ask(Rebuild)).unwrap()
        except WorkerStopped:
            return False

    def snapshot(self) -> WorkerSnapshot:
        return self._board.read()

    def close(self) -> None:
        """No more messages: the Worker ends once it has answered those already sent."""
        self._send.close()

    async def _ask(self, make: Callable[[trio.MemorySendChannel[T]], WorkerMessage]) -> T:
        send, recv = trio.open_memory_channel[T](1)
        async with recv:
            try:
                await self._send.send(make(send))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise WorkerStopped(f"{self.name} has stopped") from None
            try:
                return await recv.receive()
            except trio.EndOfChannel:
                raise WorkerStopped(f"{self.name} stopped before answering") from None
