"""Placement: the actor that owns the device inventory and gives each deployment's replicas
their compute.

Invariants:
- On CPU, a deployment's replicas split the cores between them (torch intra-op threads); asking
  for more replicas than cores fails that deployment with a clear reason instead of
  oversubscribing.
- Every assignment is recorded until the deployment releases it, and the actor publishes a
  `PlacementSnapshot` (devices, assignments, inbox depth) after every change, so the tree shows
  who holds what. Others hold a `PlacementHandle`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import trio

from ..engine.messages import Board, reply
from .mailbox import ActorGone, ask, refuse_pending


class PlacementError(RuntimeError):
    pass


@dataclass(frozen=True)
class Assign:
    deployment: str
    replicas: int
    reply: trio.MemorySendChannel[list[int] | PlacementError]


@dataclass(frozen=True)
class Release:
    deployment: str


@dataclass(frozen=True)
class PlacementSnapshot:
    state: str  # "created" | "running" | "stopped"
    cpu_threads: int
    assignments: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    inbox_depth: int = 0

    def describe(self) -> dict[str, object]:
        return {"state": self.state, "inbox": self.inbox_depth,
                "devices": [{"device": "cpu", "threads": self.cpu_threads}],
                "assignments": {k: list(v) for k, v in self.assignments.items()}}


class PlacementHandle:
    def __init__(self, send: trio.MemorySendChannel[Assign | Release], board: Board[PlacementSnapshot]) -> None:
        self._send, self._board = send, board

    async def assign(self, deployment: str, replicas: int) -> list[int]:
        """torch threads for each of the deployment's replicas; raises PlacementError."""
        try:
            answer: list[int] | PlacementError = await ask(self._send, lambda r: Assign(deployment, replicas, r))
        except ActorGone:
            raise PlacementError("placement has stopped") from None
        if isinstance(answer, PlacementError):
            raise answer
        return answer

    def release(self, deployment: str) -> None:
        """Never blocks (called from cleanup): a release that finds the inbox full or closed is
        moot — the runtime is stopping, or the assignment is replaced on the next assign."""
        try:
            self._send.send_nowait(Release(deployment))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def snapshot(self) -> PlacementSnapshot:
        return replace(self._board.read(), inbox_depth=self._send.statistics().current_buffer_used)


class Placement:
    def __init__(self, cpu_threads: int | None = None) -> None:
        self.cpu_threads = cpu_threads or len(os.sched_getaffinity(0))
        self._assignments: dict[str, tuple[int, ...]] = {}
        self._send, self._inbox = trio.open_memory_channel[Assign | Release](256)
        self._board = Board(PlacementSnapshot("created", self.cpu_threads))
        self.handle = PlacementHandle(self._send, self._board)

    def _publish(self, state: str = "running") -> None:
        self._board.publish(PlacementSnapshot(state, self.cpu_threads, MappingProxyType(dict(self._assignments))))

    async def run(self, *, task_status: trio.TaskStatus[PlacementHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self._publish()
        task_status.started(self.handle)
        try:
            async for msg in self._inbox:
                self._handle(msg)
                self._publish()
        finally:
            refuse_pending(self._inbox)
            self._inbox.close()
            self._publish("stopped")

    def _handle(self, msg: Assign | Release) -> None:
        if isinstance(msg, Release):
            self._assignments.pop(msg.deployment, None)
        elif msg.replicas > self.cpu_threads:
            reply(msg.reply, PlacementError(
                f"{msg.replicas} replicas need at least {msg.replicas} CPU cores; "
                f"this machine has {self.cpu_threads}"))
        else:
            threads = [self.cpu_threads // msg.replicas] * msg.replicas
            self._assignments[msg.deployment] = tuple(threads)
            if not reply(msg.reply, threads):  # the deployment was cancelled while asking
                self._assignments.pop(msg.deployment, None)
