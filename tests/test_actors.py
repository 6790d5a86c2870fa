"""The runtime's actors behind their handles. The small ones (DpCoordinator, Placement) answer
callers that gave up without failing: found by the soak run, where a client that disconnected
while its request waited for a replica pick broke the coordinator, and with it the whole
deployment. A Deployment refuses illegal state moves, admits a request in one message, and
ends its drain when its last ticket comes back (an event, not a poll)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from atomr_trio.executor import gc_heap
from atomr_trio.executor.context import Context
from atomr_trio.runtime.deployment import DeploymentUnavailable
from atomr_trio.runtime.deployment_spec import DeploymentSpec, ServingPolicy
from atomr_trio.runtime.deployment_state import IllegalTransition, next_state
from atomr_trio.runtime.dp_coordinator import DpCoordinator
from atomr_trio.runtime.mailbox import ActorGone, ask, refuse_pending
from atomr_trio.runtime.placement import Placement, PlacementRequest, ReplicaSlot
from atomr_trio.runtime.ticket import Admission
from atomr_trio.runtime.tree import open_runtime


async def test_the_coordinator_survives_a_caller_that_gave_up() -> None:
    coord = DpCoordinator()
    handle = coord.handle
    core = SimpleNamespace(name="m/engine-0", snapshot=lambda: SimpleNamespace(state="serving"))
    await handle.add(core)  # type: ignore[arg-type]
    with trio.move_on_after(0.05):
        await handle.pick()  # queued while the actor is not running yet; then this caller leaves
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        assert await handle.pick() is core  # the actor answered the abandoned pick and lives on
        assert handle.snapshot().routed == {core.name: 1}  # the abandoned pick is not counted
        handle.unroute(core.name)  # its deployment took the pick back
        assert await handle.pick() is core
        assert handle.snapshot().routed == {core.name: 1}
        nursery.cancel_scope.cancel()
    assert handle.snapshot().state == "stopped"


async def test_placement_survives_a_caller_that_gave_up() -> None:
    placement = Placement(cpu_threads=2, gpus=[])
    with trio.move_on_after(0.05):
        await placement.handle.assign(PlacementRequest("gone", 1))
    async with trio.open_nursery() as nursery:
        await nursery.start(placement.run)
        assert await placement.handle.assign(PlacementRequest("here", 2)) == [ReplicaSlot("cpu", 1)] * 2
        # nothing held for the caller that left
        assert placement.handle.snapshot().assignments == {"here": (ReplicaSlot("cpu", 1),) * 2}
        placement.handle.release("here")
        await trio.testing.wait_all_tasks_blocked()
        assert placement.handle.snapshot().assignments == {}
        nursery.cancel_scope.cancel()


async def test_a_question_to_an_actor_that_ended_is_answered_actor_gone() -> None:
    """A message left in an ended actor's inbox has its reply channel closed: no caller waits forever."""
    coord = DpCoordinator()
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        nursery.cancel_scope.cancel()
    assert await coord.handle.pick() is None  # the inbox is closed
    send, inbox = trio.open_memory_channel[object](4)
    async with trio.open_nursery() as nursery:
        async def ender() -> None:
            await trio.testing.wait_all_tasks_blocked()
            refuse_pending(inbox)

        nursery.start_soon(ender)
        try:
            await ask(send, lambda r: SimpleNamespace(reply=r))
            raise AssertionError("answered")
        except ActorGone:
            pass


# ---- the Deployment actor: its state machine, one-trip admission, drain by event ----------------

def test_the_state_machine_refuses_illegal_moves() -> None:
    assert next_state("d", "pending", "loading", None) == "loading"
    assert next_state("d", "serving", "draining", None) == "draining"
    assert next_state("d", "draining", "failed", "engine failed") == "failed"
    for current, wanted in (("failed", "draining"), ("failed", "serving"), ("stopped", "serving"),
                            ("pending", "serving"), ("draining", "serving"), ("stopped", "failed")):
        with pytest.raises(IllegalTransition):
            next_state("d", current, wanted, "why")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reason"):
        next_state("d", "serving", "failed", None)


def _tiny(path: Path, name: str = "tiny", **kw: Any) -> DeploymentSpec:
    return DeploymentSpec(name=name, model=str(path), dtype="float32", max_model_len=128,
                          kv_cache_memory_bytes=4 << 20, **kw)


async def test_a_failed_deployment_is_removed_without_draining(tmp_path: Path) -> None:
    async with open_runtime([DeploymentSpec(name="gone", model=str(tmp_path / "nothing-here"))]) as runtime:
        dep = runtime.manager.get("gone")
        assert dep is not None and dep.snapshot().state == "failed"
        with pytest.raises(DeploymentUnavailable, match="is failed: ") as e:
            await dep.admit([(3, 1, 2)])
        assert e.value.status == 503 and "nothing-here" not in str(e.value)  # no server path to clients
        removed = await runtime.manager.remove("gone")
        assert removed is not None and removed.state == "failed"  # not failed -> draining
        with trio.fail_after(5):
            await dep.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert dep.snapshot().state == "failed" and runtime.manager.get("gone") is None


async def test_admission_is_one_message_and_the_ticket_is_released_once(tiny_model_dir: Path) -> None:
    capped = _tiny(tiny_model_dir, max_num_seqs=1, serving=ServingPolicy(max_queue=0))
    async with open_runtime([capped]) as runtime:
        dep = runtime.manager.get("tiny")
        assert dep is not None
        assert dep.serving_model()[0].tokenizer.encode("hi")  # tokenizing needs no admission
        admission = await dep.admit([(8, 1, 4)])
        assert isinstance(admission, Admission) and admission.engine.name == "tiny/engine-0"
        snap = dep.snapshot()
        assert snap.admitted == 1 and snap.routed == {"tiny/engine-0": 1} and not dep.is_idle()
        with pytest.raises(DeploymentUnavailable, match="at capacity") as e:
            await dep.admit([(8, 1, 4)])
        assert e.value.status == 429 and e.value.retry_after
        with admission.ticket:
            pass
        admission.ticket.release()  # idempotent
        with trio.fail_after(5):
            await dep.wait_idle()
        assert dep.snapshot().admitted == 0
        with (await dep.admit([(8, 1, 4)])).ticket:  # the slot is free again
            assert dep.snapshot().admitted == 1
        await runtime.wait_idle()
        tree = runtime.tree()
        actors = {n["actor"] for n in _nodes(tree)}
        assert actors == {"Runtime", "Metrics", "Placement", "DeploymentManager", "Deployment", "DpCoordinator",
                          "EngineCore", "Worker", "Context"}
        assert all("state" in n for n in _nodes(tree))


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("children", []) for n in _nodes(child))]


async def test_a_drain_ends_when_the_last_ticket_comes_back(tiny_model_dir: Path) -> None:
    async with open_runtime([_tiny(tiny_model_dir)]) as runtime:
        dep = runtime.manager.get("tiny")
        assert dep is not None
        ticket = (await dep.admit([(8, 1, 4)])).ticket
        removed = await runtime.manager.remove("tiny")  # the drain timeout is 30 s
        assert removed is not None and removed.state == "draining"
        with pytest.raises(DeploymentUnavailable, match="is draining") as e:
            await dep.admit([(8, 1, 4)])
        assert e.value.status == 503
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.manager.get("tiny") is dep  # still there: a request holds a ticket
        t0 = trio.current_time()
        ticket.release()
        with trio.fail_after(5):
            await dep.wait_ended()
        assert trio.current_time() - t0 < 5 and dep.snapshot().state == "stopped"
        await trio.testing.wait_all_tasks_blocked()  # the manager takes it out of the catalog
        assert runtime.manager.get("tiny") is None
        assert dep.snapshot().replicas[0].state == "stopped"


async def test_a_removed_deployment_is_freed_although_the_server_froze_its_heap(tiny_model_dir: Path) -> None:
    # python -m atomr_trio freezes its heap once it listens (executor/gc_heap.py): a deployment
    # alive then and removed later must still be freed, a reference cycle through it included
    before = {id(o) for o in gc.get_objects() if isinstance(o, Context)}
    assert not gc_heap.frozen() and gc.get_freeze_count() == 0
    try:
        async with open_runtime([_tiny(tiny_model_dir)]) as runtime:
            (ctx,) = [o for o in gc.get_objects() if isinstance(o, Context) and id(o) not in before]
            ctx.cycle = ctx  # type: ignore[attr-defined]
            gone = weakref.ref(ctx)
            del ctx
            gc_heap.freeze()
            removed = await runtime.manager.remove("tiny")
            assert removed is not None
            dep = runtime.manager.get("tiny")
            assert dep is not None
            with trio.fail_after(10):
                await dep.wait_ended()
            del dep
            await trio.testing.wait_all_tasks_blocked()  # the manager takes it out of the catalog
            assert runtime.manager.get("tiny") is None
            assert gone() is None
            assert gc_heap.frozen() and gc.get_freeze_count() > 0, "what survived is frozen again"
    finally:
        gc_heap.thaw()
