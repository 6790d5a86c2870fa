"""DpCoordinator: the actor that picks one data-parallel replica of a deployment per request.

Invariants:
- Engines report their load after every step with `report_load`, which never blocks (a full
  inbox drops the report; the next step sends a fresh one).
- A pick is the serving replica with the least load — running + waiting requests plus KV-cache
  usage from its latest report — counting the requests routed to it since that report, so a
  burst of requests spreads over the replicas instead of piling onto the one that looked idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..engine.engine_core import EngineHandle
from ..engine.messages import reply


@dataclass(frozen=True)
class LoadReport:
    engine: str
    load: float


@dataclass(frozen=True)
class Pick:
    reply: trio.MemorySendChannel[EngineHandle | None]


class DpCoordinator:
    def __init__(self) -> None:
        self.replicas: list[EngineHandle] = []
        self.routed: dict[str, int] = {}  # requests sent to each replica, in all
        self._load: dict[str, float] = {}
        self._since_report: dict[str, int] = {}
        self._send, self._inbox = trio.open_memory_channel[LoadReport | Pick](1024)

    def add(self, core: EngineHandle) -> None:
        self.replicas.append(core)
        self.routed[core.name] = self._since_report[core.name] = 0
        self._load[core.name] = 0.0

    def serving(self) -> list[EngineHandle]:
        return [c for c in self.replicas if c.snapshot().state == "serving"]

    # ---- what others call --------------------------------------------------------------
    def report_load(self, engine: str, load: float) -> None:
        try:
            self._send.send_nowait(LoadReport(engine, load))
        except trio.WouldBlock:
            pass

    async def pick(self) -> EngineHandle | None:
        """None when no replica serves (or the coordinator has stopped)."""
        send, recv = trio.open_memory_channel[EngineHandle | None](1)
        try:
            await self._send.send(Pick(send))
        except trio.BrokenResourceError:
            return None
        async with recv:
            return await recv.receive()

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._inbox:
            async for msg in self._inbox:
                if isinstance(msg, LoadReport):
                    self._load[msg.engine] = msg.load
                    self._since_report[msg.engine] = 0
                else:
                    core = self._choose()
                    if not reply(msg.reply, core) and core is not None:
                        self.routed[core.name] -= 1  # the caller gave up before hearing back
                        self._since_report[core.name] -= 1

    def _choose(self) -> EngineHandle | None:
        live = self.serving()
        if not live:
            return None
        core = min(live, key=lambda c: self._load[c.name] + self._since_report[c.name])
        self.routed[core.name] += 1
        self._since_report[core.name] += 1
        return core
