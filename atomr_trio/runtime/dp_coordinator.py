"""DpCoordinator: the actor that picks one data-parallel replica of a deployment per request.

Invariants:
- Engines report their load after every step with `report_load`, which never blocks (a full
  inbox drops the report; the next step sends a fresh one).
- A pick is the serving replica with the least load — running + waiting requests plus KV-cache
  usage from its latest report — counting the requests routed to it since that report, so a
  burst of requests spreads over the replicas instead of piling onto the one that looked idle.
- A pick whose caller gave up (or that its deployment takes back with `unroute`) is not counted.
- The actor publishes a `CoordinatorSnapshot` (replicas, routed counts, inbox depth) after every
  change; others hold a `CoordinatorHandle`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import trio

from ..engine.engine_core import EngineHandle
from ..engine.messages import Board, reply
from .mailbox import ActorGone, ask, refuse_pending


@dataclass(frozen=True)
class LoadReport:
    engine: str
    load: float


@dataclass(frozen=True)
class AddReplica:
    engine: EngineHandle


@dataclass(frozen=True)
class Pick:
    reply: trio.MemorySendChannel[EngineHandle | None]


@dataclass(frozen=True)
class Unroute:
    """The deployment took a pick back (its request's caller left before hearing of it)."""

    engine: str


Message = LoadReport | AddReplica | Pick | Unroute


@dataclass(frozen=True)
class CoordinatorSnapshot:
    state: str  # "created" | "running" | "stopped"
    routed: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # requests per replica, in all
    inbox_depth: int = 0


class CoordinatorHandle:
    def __init__(self, send: trio.MemorySendChannel[Message], board: Board[CoordinatorSnapshot]) -> None:
        self._send, self._board = send, board

    def report_load(self, engine: str, load: float) -> None:
        self._tell(LoadReport(engine, load))

    async def add(self, engine: EngineHandle) -> None:
        await self._send.send(AddReplica(engine))

    async def pick(self) -> EngineHandle | None:
        """None when no replica serves (or the coordinator has stopped)."""
        try:
            return await ask(self._send, Pick)
        except ActorGone:
            return None

    def unroute(self, engine: str) -> None:
        self._tell(Unroute(engine))

    def _tell(self, msg: Message) -> None:
        try:
            self._send.send_nowait(msg)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def snapshot(self) -> CoordinatorSnapshot:
        return replace(self._board.read(), inbox_depth=self._send.statistics().current_buffer_used)


class DpCoordinator:
    def __init__(self) -> None:
        self._replicas: list[EngineHandle] = []
        self._routed: dict[str, int] = {}
        self._load: dict[str, float] = {}
        self._since_report: dict[str, int] = {}
        self._send, self._inbox = trio.open_memory_channel[Message](1024)
        self._board = Board(CoordinatorSnapshot("created"))
        self.handle = CoordinatorHandle(self._send, self._board)

    def _publish(self, state: str = "running") -> None:
        self._board.publish(CoordinatorSnapshot(state, MappingProxyType(dict(self._routed))))

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[CoordinatorHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self._publish()
        task_status.started(self.handle)
        try:
            async for msg in self._inbox:
                if isinstance(msg, LoadReport):
                    if msg.engine in self._load:
                        self._load[msg.engine] = msg.load
                        self._since_report[msg.engine] = 0
                    continue  # the routed counts did not change
                if isinstance(msg, AddReplica):
                    self._add(msg.engine)
                elif isinstance(msg, Unroute):
                    self._uncount(msg.engine)
                else:
                    core = self._choose()
                    if not reply(msg.reply, core) and core is not None:
                        self._uncount(core.name)  # the caller gave up before hearing back
                self._publish()
        finally:
            refuse_pending(self._inbox)
            self._inbox.close()
            self._publish("stopped")

    def _add(self, core: EngineHandle) -> None:
        self._replicas.append(core)
        self._routed[core.name] = self._since_report[core.name] = 0
        self._load[core.name] = 0.0

    def _uncount(self, name: str) -> None:
        if name in self._routed:
            self._routed[name] -= 1
            self._since_report[name] = max(0, self._since_report[name] - 1)

    def _choose(self) -> EngineHandle | None:
        live = [c for c in self._replicas if c.snapshot().state == "serving"]
        if not live:
            return None
        core = min(live, key=lambda c: self._load[c.name] + self._since_report[c.name])
        self._routed[core.name] += 1
        self._since_report[core.name] += 1
        return core
