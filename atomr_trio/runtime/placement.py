"""Placement: the actor that owns the device inventory and gives each deployment's replicas
their compute.

Invariants:
- On CPU, a deployment's replicas split the cores between them (torch intra-op threads); asking
  for more replicas than cores fails that deployment with a clear reason instead of
  oversubscribing.
- Every assignment is recorded until the deployment releases it, so the tree shows who holds what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from ..engine.messages import reply


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


class Placement:
    def __init__(self, cpu_threads: int | None = None) -> None:
        self.cpu_threads = cpu_threads or len(os.sched_getaffinity(0))
        self.assignments: dict[str, list[int]] = {}
        self._send, self._inbox = trio.open_memory_channel[Assign | Release](256)

    # ---- what others call --------------------------------------------------------------
    async def assign(self, deployment: str, replicas: int) -> list[int]:
        """torch threads for each of the deployment's replicas; raises PlacementError."""
        send, recv = trio.open_memory_channel[list[int] | PlacementError](1)
        await self._send.send(Assign(deployment, replicas, send))
        async with recv:
            answer = await recv.receive()
        if isinstance(answer, PlacementError):
            raise answer
        return answer

    def release(self, deployment: str) -> None:
        try:
            self._send.send_nowait(Release(deployment))
        except (trio.WouldBlock, trio.BrokenResourceError):
            pass

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._inbox:
            async for msg in self._inbox:
                if isinstance(msg, Release):
                    self.assignments.pop(msg.deployment, None)
                elif msg.replicas > self.cpu_threads:
                    reply(msg.reply, PlacementError(
                        f"{msg.replicas} replicas need at least {msg.replicas} CPU cores; "
                        f"this machine has {self.cpu_threads}"))
                else:
                    threads = [self.cpu_threads // msg.replicas] * msg.replicas
                    self.assignments[msg.deployment] = threads
                    if not reply(msg.reply, threads):  # the deployment was cancelled while asking
                        self.assignments.pop(msg.deployment, None)

    def describe(self) -> dict[str, object]:
        return {"devices": [{"device": "cpu", "threads": self.cpu_threads}],
                "assignments": dict(self.assignments)}
