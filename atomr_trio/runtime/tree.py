"""Runtime: the root of the actor tree — Metrics, Placement and the DeploymentManager, whose
deployments each supervise their replicas (EngineCore -> Worker -> Context).

Invariants:
- Every actor runs in a nursery owned here; leaving `open_runtime` cancels them all and every
  live request ends with a final event.
- The Runtime holds handles only: `tree()` is built from the actors' snapshots, `abort_all()`
  and `wait_idle()` go through the deployments' handles, and the one state the Runtime keeps
  itself (draining, for the gateway to refuse new requests) is set by `begin_drain()`.
- Deployments are applied and removed at runtime: a removed deployment drains (in-flight
  requests finish, new ones get 503) and is then gone (404); others are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..engine.engine_core import EngineSnapshot
from .deployment_manager import DeploymentManager, ManagerHandle
from .deployment_spec import DeploymentSpec
from .deployment_state import DeploymentSnapshot
from .metrics import Metrics, MetricsHandle
from .placement import Placement, PlacementHandle

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, manager: ManagerHandle, metrics: MetricsHandle, placement: PlacementHandle) -> None:
        self.manager = manager
        self.metrics = metrics
        self.placement = placement
        self._draining = False

    def begin_drain(self) -> None:
        """The server is shutting down: from now on new requests get 503."""
        self._draining = True

    @property
    def is_draining(self) -> bool:
        return self._draining

    async def abort_all(self) -> None:
        """End every request in every engine now (each gets finish_reason "abort")."""
        for dep in self.manager.handles():
            await dep.abort_all()

    async def wait_idle(self) -> None:
        """Until no deployment has a ticket out (each request's handler or stream has ended)."""
        while True:
            for dep in self.manager.handles():
                await dep.wait_idle()
            if all(dep.is_idle() for dep in self.manager.handles()):
                return

    def tree(self) -> dict[str, Any]:
        """A live view of the actor tree: each actor, its state and inbox depth."""
        manager, metrics = self.manager.snapshot(), self.metrics.snapshot()
        return {"actor": "Runtime", "state": "draining" if self._draining else "running", "children": [
            {"actor": "Metrics", "state": metrics.state, "inbox": metrics.inbox_depth},
            {"actor": "Placement", **self.placement.snapshot().describe()},
            {"actor": "DeploymentManager", "state": manager.state, "inbox": manager.inbox_depth,
             "children": [_deployment_node(d) for d in manager.deployments]},
        ]}


def _deployment_node(d: DeploymentSnapshot) -> dict[str, Any]:
    c = d.coordinator
    coordinator = {"actor": "DpCoordinator", "state": c.state, "inbox": c.inbox_depth, "routed": dict(c.routed)}
    return {"actor": "Deployment", "name": d.name, "state": d.state, "reason": d.reason, "inbox": d.inbox_depth,
            "admitted": d.admitted, "children": [coordinator, *(_engine_node(s) for s in d.replicas)]}


def _engine_node(s: EngineSnapshot) -> dict[str, Any]:
    w = s.worker
    context = {"actor": "Context", "state": "ready" if w.state == "ready" else "absent", "kernels": w.kernels}
    worker = {"actor": "Worker", "name": w.name, "device": w.device, "memory_bytes": w.memory_bytes,
              "state": w.state, "context_builds": w.context_builds, "inbox": w.inbox_depth, "children": [context]}
    return {"actor": "EngineCore", "name": s.name, "state": s.state, "inbox": s.inbox_depth,
            "running": s.num_requests_running, "waiting": s.num_requests_waiting,
            "kv_cache_usage": round(s.kv_cache_usage, 4), "children": [worker]}


@asynccontextmanager
async def open_runtime(specs: Sequence[DeploymentSpec], metrics_prefix: str = "atomr",
                       drain_timeout: float = 30.0, placement: Placement | None = None) -> AsyncIterator[Runtime]:
    """The actor tree for these deployments. `metrics_prefix`: "atomr" or "vllm" (vLLM's exact
    series names, see metrics.py). `placement`: an actor not yet run (tests give one a fake GPU
    inventory); by default one over this machine's cores and the GPUs torch sees."""
    metrics_actor, placement_actor = Metrics(prefix=metrics_prefix), placement or Placement()
    async with trio.open_nursery() as nursery:
        metrics: MetricsHandle = await nursery.start(metrics_actor.run)
        places: PlacementHandle = await nursery.start(placement_actor.run)
        manager: ManagerHandle = await nursery.start(DeploymentManager(places, metrics, drain_timeout).run)
        for spec in specs:
            await manager.apply(spec)
        try:
            yield Runtime(manager, metrics, places)
        finally:
            nursery.cancel_scope.cancel()
