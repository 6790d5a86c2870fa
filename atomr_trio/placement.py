"""Placement: which compute each engine replica gets.

Invariant: replicas of all deployments never ask for more than the machine has. On CPU a
deployment's replicas split the cores between them (torch intra-op threads); a request for more
replicas than cores fails the deployment with a clear reason instead of oversubscribing.
"""

from __future__ import annotations

import os


class PlacementError(RuntimeError):
    pass


class Placement:
    def __init__(self, cpu_threads: int | None = None) -> None:
        self.cpu_threads = cpu_threads or len(os.sched_getaffinity(0))

    def assign(self, replicas: int) -> list[int]:
        """torch threads for each of `replicas` CPU replicas."""
        if replicas > self.cpu_threads:
            raise PlacementError(
                f"{replicas} replicas need at least {replicas} CPU cores; this machine has {self.cpu_threads}"
            )
        per = self.cpu_threads // replicas
        return [per] * replicas

    def describe(self) -> dict[str, object]:
        return {"devices": [{"device": "cpu", "threads": self.cpu_threads}]}
