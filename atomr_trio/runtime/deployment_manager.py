"""DeploymentManager: the actor that owns the catalog of deployments, behind a `ManagerHandle`.

Invariants:
- Changes arrive as Apply / Remove messages; lookups (`get`, `snapshot`) read the catalog the
  actor publishes on its Board, never the actor.
- One change at a time per deployment name. Applying a changed spec drains the old deployment
  first; applying the same spec again answers the one that loads or serves.
- Removing is a message to the deployment (drain): it stops admitting, waits for its tickets
  (its idle event, up to `drain_timeout`), stops its replicas and ends; only then does it leave
  the catalog (404). The manager never writes a deployment's fields.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import trio

from ..engine.messages import Board, reply
from ..executor import gc_heap
from .deployment import Deployment, DeploymentHandle
from .deployment_spec import DeploymentSpec
from .deployment_state import DeploymentSnapshot
from .mailbox import ActorGone, ask, refuse_pending
from .metrics import MetricsHandle
from .placement import PlacementHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Apply:
    spec: DeploymentSpec
    reply: trio.MemorySendChannel[DeploymentSnapshot]


@dataclass(frozen=True)
class Remove:
    name: str
    reply: trio.MemorySendChannel[DeploymentSnapshot | None]


@dataclass(frozen=True)
class ManagerSnapshot:
    state: str  # "created" | "running" | "stopped"
    inbox_depth: int
    deployments: tuple[DeploymentSnapshot, ...]


class ManagerHandle:
    def __init__(self, send: trio.MemorySendChannel[Apply | Remove],
                 catalog: Board[Mapping[str, DeploymentHandle]], state: Board[str]) -> None:
        self._send, self._catalog, self._state = send, catalog, state

    async def apply(self, spec: DeploymentSpec) -> DeploymentSnapshot:
        """Start a new deployment, or replace a changed one; answers once it serves or failed."""
        try:
            return await ask(self._send, lambda r: Apply(spec, r))
        except ActorGone:
            raise RuntimeError("the deployment manager has stopped") from None

    async def remove(self, name: str) -> DeploymentSnapshot | None:
        """Begin draining a deployment (None if unknown); it disappears once its requests end."""
        try:
            return await ask(self._send, lambda r: Remove(name, r))
        except ActorGone:
            return None

    def get(self, name: str) -> DeploymentHandle | None:
        return self._catalog.read().get(name)

    def handles(self) -> list[DeploymentHandle]:
        return list(self._catalog.read().values())

    def snapshot(self) -> ManagerSnapshot:
        return ManagerSnapshot(self._state.read(), self._send.statistics().current_buffer_used,
                               tuple(h.snapshot() for h in self._catalog.read().values()))

    def describe(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.snapshot().deployments]


class DeploymentManager:
    def __init__(self, placement: PlacementHandle, metrics: MetricsHandle | None, drain_timeout: float = 30.0) -> None:
        self._placement, self._metrics = placement, metrics
        self.drain_timeout = drain_timeout
        self._deployments: dict[str, DeploymentHandle] = {}
        self._locks: dict[str, trio.Lock] = {}  # one change at a time per deployment name
        self._send, self._inbox = trio.open_memory_channel[Apply | Remove](64)
        self._catalog: Board[Mapping[str, DeploymentHandle]] = Board(MappingProxyType({}))
        self._state = Board("created")
        self.handle = ManagerHandle(self._send, self._catalog, self._state)

    def _publish(self) -> None:
        self._catalog.publish(MappingProxyType(dict(self._deployments)))

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[ManagerHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self._state.publish("running")
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.handle)
                async for msg in self._inbox:
                    if isinstance(msg, Apply):
                        nursery.start_soon(self._apply, msg, nursery)  # loading takes seconds
                    else:
                        nursery.start_soon(self._remove, msg)
        finally:
            refuse_pending(self._inbox)
            self._inbox.close()
            self._state.publish("stopped")

    async def _apply(self, msg: Apply, nursery: trio.Nursery) -> None:
        spec = msg.spec
        async with self._locks.setdefault(spec.name, trio.Lock()):
            old = self._deployments.get(spec.name)
            if old is not None:
                snap = old.snapshot()
                if snap.spec == spec and snap.state in ("pending", "loading", "serving"):
                    reply(msg.reply, snap)
                    return
                await old.drain(self.drain_timeout)
                await old.wait_ended()
            dep = Deployment(spec, self._placement, self._metrics)
            self._deployments[spec.name] = dep.handle
            self._publish()
            await nursery.start(self._run, dep)
            reply(msg.reply, dep.handle.snapshot())

    async def _run(self, dep: Deployment, *, task_status: trio.TaskStatus[DeploymentHandle]) -> None:
        """A deployment's life; when it ends (drained) it leaves the catalog."""
        try:
            await dep.run(task_status=task_status)
        finally:
            if self._deployments.get(dep.name) is dep.handle:
                del self._deployments[dep.name]
                self._publish()
                log.info("deployment %s removed", dep.name)
            del dep
            if gc_heap.frozen():  # a cycle through what the server froze at its start is freed too
                gc_heap.collect()

    async def _remove(self, msg: Remove) -> None:
        dep = self._deployments.get(msg.name)
        reply(msg.reply, None if dep is None else await dep.drain(self.drain_timeout))
