"""DpCoordinator: picks one data-parallel replica of a deployment for each request.

Invariant: the pick is the serving replica with the least load — running + waiting requests
plus KV-cache usage, as each EngineCore left them after its last step — so a request never
waits behind a busy replica while another is idle. Picking never blocks.
"""

from __future__ import annotations

from .engine_core import EngineCore


def replica_load(core: EngineCore) -> float:
    return core.num_running + core.num_waiting + core.block_manager.usage


class DpCoordinator:
    def __init__(self) -> None:
        self.replicas: list[EngineCore] = []
        self.routed: dict[str, int] = {}  # requests sent to each replica

    def add(self, core: EngineCore) -> None:
        self.replicas.append(core)
        self.routed[core.name] = 0

    def serving(self) -> list[EngineCore]:
        return [c for c in self.replicas if c.state == "serving"]

    def pick(self) -> EngineCore | None:
        live = self.serving()
        if not live:
            return None
        core = min(live, key=replica_load)
        self.routed[core.name] += 1
        return core
