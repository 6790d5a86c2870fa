"""Runtime: the root of the actor tree — Metrics, Placement and the DeploymentManager, whose
deployments each supervise their replicas (EngineCore -> Worker -> Context).

Invariants:
- Every actor runs in a nursery owned here; leaving `open_runtime` cancels them all and every
  live request ends with a final event.
- Deployments are applied and removed at runtime: a removed deployment drains (in-flight
  requests finish, new ones get 503) and is then gone (404); others are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ..engine.messages import reply
from .deployment import Deployment, DeploymentSpec
from .metrics import Metrics
from .placement import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Apply:
    spec: DeploymentSpec
    reply: trio.MemorySendChannel[Deployment]


@dataclass(frozen=True)
class Remove:
    name: str
    reply: trio.MemorySendChannel[Deployment | None]


class DeploymentManager:
    """The actor that owns the catalog. Changes arrive as Apply / Remove messages; lookups
    (`get`, `deployments`) are plain reads of the catalog."""

    def __init__(self, placement: Placement, metrics: Metrics | None, drain_timeout: float = 30.0) -> None:
        self.placement = placement
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.deployments: dict[str, Deployment] = {}
        self._locks: dict[str, trio.Lock] = {}  # one change at a time per deployment name
        self._send, self._inbox = trio.open_memory_channel[Apply | Remove](64)

    # ---- what others call --------------------------------------------------------------
    def get(self, name: str) -> Deployment | None:
        return self.deployments.get(name)

    async def apply(self, spec: DeploymentSpec) -> Deployment:
        """Start a new deployment, or replace a changed one; returns once it serves or failed."""
        send, recv = trio.open_memory_channel[Deployment](1)
        await self._send.send(Apply(spec, send))
        async with recv:
            return await recv.receive()

    async def remove(self, name: str) -> Deployment | None:
        """Begin draining a deployment (None if unknown); it disappears once its requests end."""
        send, recv = trio.open_memory_channel[Deployment | None](1)
        await self._send.send(Remove(name, send))
        async with recv:
            return await recv.receive()

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with self._inbox:
                async for msg in self._inbox:
                    if isinstance(msg, Apply):
                        nursery.start_soon(self._apply, msg, nursery)  # loading takes seconds
                    else:
                        dep = self.deployments.get(msg.name)
                        if dep is not None and dep.state != "draining":
                            dep.state = "draining"
                            nursery.start_soon(self._drain, dep, self.drain_timeout)
                        reply(msg.reply, dep)

    async def _apply(self, msg: Apply, nursery: trio.Nursery) -> None:
        spec = msg.spec
        async with self._locks.setdefault(spec.name, trio.Lock()):
            old = self.deployments.get(spec.name)
            if old is not None and old.spec == spec and old.state in ("loading", "serving"):
                reply(msg.reply, old)
                return
            if old is not None:
                await self._drain(old, self.drain_timeout)
            dep = Deployment(spec, self.placement, self.metrics)
            self.deployments[spec.name] = dep
            await nursery.start(dep.run)
            reply(msg.reply, dep)

    async def _drain(self, dep: Deployment, timeout: float) -> None:
        dep.state = "draining"
        with trio.move_on_after(timeout):
            while dep.in_flight():
                await trio.sleep(0.05)
        dep.cancel_scope.cancel()
        if self.deployments.get(dep.name) is dep:
            del self.deployments[dep.name]
        log.info("deployment %s removed", dep.name)

    def describe(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.deployments.values()]


class Runtime:
    def __init__(self, manager: DeploymentManager, metrics: Metrics, placement: Placement) -> None:
        self.manager = manager
        self.metrics = metrics
        self.placement = placement
        self.draining = False  # set on the first shutdown signal: new requests get 503

    async def abort_all(self) -> None:
        """End every request in every engine now (each gets finish_reason "abort")."""
        for dep in self.manager.deployments.values():
            for core in dep.replicas:
                await core.abort_all()

    def tree(self) -> dict[str, Any]:
        """A live view of the actor tree: each actor, its state and queue depth."""
        deployments = []
        for d in self.manager.deployments.values():
            replicas = []
            for s in (c.snapshot() for c in d.replicas):
                w = s.worker
                context = {"actor": "Context", "state": "ready" if w.state == "ready" else "absent",
                           "kernels": w.kernels}
                worker = {"actor": "Worker", "name": w.name, "device": w.device, "state": w.state,
                          "context_builds": w.context_builds, "inbox": w.inbox_depth, "children": [context]}
                replicas.append({"actor": "EngineCore", "name": s.name, "state": s.state, "inbox": s.inbox_depth,
                                 "running": s.num_requests_running, "waiting": s.num_requests_waiting,
                                 "kv_cache_usage": round(s.kv_cache_usage, 4), "children": [worker]})
            coordinator = {"actor": "DpCoordinator", "routed": dict(d.coordinator.routed)}
            deployments.append({"actor": "Deployment", "name": d.name, "state": d.state, "reason": d.reason,
                                "children": [coordinator, *replicas]})
        return {"actor": "Runtime", "children": [
            {"actor": "Metrics", "state": "running"},
            {"actor": "Placement", **self.placement.describe()},
            {"actor": "DeploymentManager", "children": deployments},
        ]}


@asynccontextmanager
async def open_runtime(specs: Sequence[DeploymentSpec], metrics_prefix: str = "atomr") -> AsyncIterator[Runtime]:
    """The actor tree for these deployments. `metrics_prefix`: "atomr" or "vllm" (vLLM's exact
    series names, see metrics.py)."""
    metrics, placement = Metrics(prefix=metrics_prefix), Placement()
    manager = DeploymentManager(placement, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.run)
        await nursery.start(placement.run)
        await nursery.start(manager.run)
        for spec in specs:
            await manager.apply(spec)
        try:
            yield Runtime(manager, metrics, placement)
        finally:
            nursery.cancel_scope.cancel()
