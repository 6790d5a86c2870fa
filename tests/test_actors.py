"""The small actors (DpCoordinator, Placement) answer callers that gave up without failing:
found by the soak run, where a client that disconnected while its request waited for a replica
pick broke the coordinator, and with it the whole deployment."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from atomr_trio.runtime.dp_coordinator import DpCoordinator
from atomr_trio.runtime.placement import Placement


async def test_the_coordinator_survives_a_caller_that_gave_up() -> None:
    coord = DpCoordinator()
    core = SimpleNamespace(name="m/engine-0", snapshot=lambda: SimpleNamespace(state="serving"))
    coord.add(core)  # type: ignore[arg-type]
    with trio.move_on_after(0.05):
        await coord.pick()  # queued while the actor is not running yet; then this caller leaves
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        assert await coord.pick() is core  # the actor answered the abandoned pick and lives on
        assert coord.routed[core.name] == 1  # the abandoned pick is not counted
        nursery.cancel_scope.cancel()


async def test_placement_survives_a_caller_that_gave_up() -> None:
    placement = Placement(cpu_threads=2)
    with trio.move_on_after(0.05):
        await placement.assign("gone", 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(placement.run)
        assert await placement.assign("here", 2) == [1, 1]
        assert placement.assignments == {"here": [1, 1]}  # nothing held for the caller that left
        nursery.cancel_scope.cancel()
