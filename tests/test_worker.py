"""The device tier: a DeviceThread exists only inside its block, never abandons a job and hands
each outcome over when the job behind it launches, the
restart budget is 3 rebuilds per 60 s, and a Worker answers through its handle (a step's own
exception raised in the caller, a broken Context told from a healthy one, rebuilds counted)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import outcome
import pytest
import trio

from atomr_trio.async_llm import engine_config
from atomr_trio.engine.nurseries import unwrapped
from atomr_trio.engine.sequence import Sequence
from atomr_trio.executor import gc_heap
from atomr_trio.executor import worker as worker_module
from atomr_trio.executor.context import InjectedFault
from atomr_trio.executor.device_thread import DeviceThreadClosed, open_device_thread
from atomr_trio.executor.model_runner import BatchItem, StepBatch
from atomr_trio.executor.sampler import SampleRow
from atomr_trio.executor.worker import Faults, RestartBudget, Worker, WorkerHandle
from atomr_trio.executor.worker_handle import WorkerStopped
from atomr_trio.model_source import ModelSource
from atomr_trio.sampling_params import SamplingParams


def device_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


# ---- DeviceThread ------------------------------------------------------------------------------
async def test_the_thread_lives_exactly_inside_its_block() -> None:
    async with open_device_thread("dt-block", 1) as thread:
        assert [t.is_alive() for t in device_threads("dt-block")] == [True]
        assert await thread.run(lambda: threading.current_thread().name) == "dt-block"
    assert device_threads("dt-block") == []
    with pytest.raises(DeviceThreadClosed):
        await thread.run(lambda: None)


async def test_a_cancelled_caller_submits_no_job() -> None:
    ran: list[str] = []
    async with open_device_thread("dt-cancelled", 1) as thread:
        with trio.CancelScope() as scope:
            scope.cancel()
            await thread.run(lambda: ran.append("job"))
        assert scope.cancelled_caught
        await thread.run(lambda: None)  # anything submitted would have run before this
    assert ran == []


async def test_a_job_in_flight_is_never_abandoned() -> None:
    done = threading.Event()

    def job() -> str:
        time.sleep(0.3)
        done.set()
        return "finished"

    async with open_device_thread("dt-inflight", 1) as thread:
        t0 = trio.current_time()
        got = None
        with trio.move_on_after(0.05) as scope:
            got = await thread.run(job)  # the job's result comes back although the cancel came first
            await trio.lowlevel.checkpoint()  # ... and the cancel lands at the next checkpoint
        assert got == "finished" and scope.cancelled_caught and done.is_set()
        assert trio.current_time() - t0 >= 0.3
        assert await thread.run(lambda: "next") == "next"


async def test_a_jobs_exception_is_raised_in_the_caller() -> None:
    def job() -> None:
        raise KeyError("on the device")

    async with open_device_thread("dt-error", 1) as thread:
        with pytest.raises(KeyError, match="on the device"):
            await thread.run(job)
        assert await thread.run(lambda: 2) == 2


async def test_closing_does_not_block_the_trio_thread() -> None:
    """The join happens in a worker thread: other tasks run while the device thread finishes
    what was queued before the block ended."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with open_device_thread("dt-join", 1) as thread:
            thread._jobs.put((lambda _: time.sleep(0.3), lambda _: None))  # queued by no waiting task
            await trio.sleep(0.02)
            before = ticks
        assert ticks - before >= 10, "the Trio thread was blocked while joining"
        nursery.cancel_scope.cancel()
    assert device_threads("dt-join") == []


async def test_an_outcome_is_handed_over_when_the_job_behind_it_launches() -> None:
    """With a job queued behind it, a job's outcome stays on the device thread until that job
    calls `hand_over` (right before its long call), then reaches the Trio thread while that job
    still runs; with none queued behind it, at once."""
    first_may_end = threading.Event()
    first_delivered = threading.Event()
    done = trio.Event()
    got: list[object] = []

    def first(_: object) -> str:
        first_may_end.wait(5)
        return "first"

    def second(hand_over: Callable[[], None]) -> tuple[bool, bool]:
        before = first_delivered.wait(0.2)  # time enough to arrive, had it been handed over
        hand_over()
        return before, first_delivered.wait(5)  # the Trio thread took it while this job ran

    def deliver(result: outcome.Outcome[object]) -> None:
        got.append(result.unwrap())
        if got == ["first"]:
            first_delivered.set()
        if len(got) == 2:
            done.set()

    async with open_device_thread("dt-hand-over", 1) as thread:
        thread.submit(first, deliver)
        thread.submit(second, deliver)  # queued before the first can end
        first_may_end.set()
        with trio.fail_after(10):
            await done.wait()
        assert got == ["first", (False, True)]
        with trio.fail_after(10):  # nothing queued behind it: its outcome comes without a next job
            assert await thread.run(lambda: "alone") == "alone"


def test_a_waiter_whose_owner_is_cancelled_still_gets_its_outcome() -> None:
    """Cancelled while its job runs, a waiter is still woken with the job's result (the outcome
    delivery is not cancelled with it), then the cancellation lands and the block is left. Run in
    a thread of its own: were the outcome lost, the Trio run would hang, not fail."""
    got: list[object] = []

    async def scenario() -> None:
        with trio.CancelScope() as outer:
            async with open_device_thread("dt-owner-cancelled", 1) as thread:

                async def cancel_soon() -> None:
                    await trio.sleep(0.05)
                    outer.cancel()  # while the job runs

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_soon)
                    got.append(await thread.run(lambda: time.sleep(0.3) or "finished"))
                    await trio.sleep(5)  # the cancellation lands here
        got.append(outer.cancelled_caught)

    runner = threading.Thread(target=trio.run, args=(scenario,), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "the waiter was never woken: its outcome was lost"
    assert got == ["finished", True]


def test_one_failure_leaves_the_nursery_as_itself_with_its_own_context() -> None:
    """`unwrapped` (the DeviceThread's and the EngineCore's nurseries): the one exception, not a
    group, and the exception it was raised while handling still shown as its context."""

    async def fail() -> None:
        try:
            raise KeyError("first")
        except KeyError:
            raise ValueError("second")  # noqa: B904 - the implicit context is the point

    async def owner() -> None:
        with unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)

    with pytest.raises(ValueError, match="second") as info:
        trio.run(owner)
    assert isinstance(info.value.__context__, KeyError) and not info.value.__suppress_context__


# ---- the restart budget -------------------------------------------------------------------------
def test_the_restart_budget_is_three_rebuilds_per_sixty_seconds() -> None:
    now = [1000.0]
    budget = RestartBudget(clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 59.0
    assert not budget.take()  # still inside the window of the first three
    now[0] += 1.5  # the first three are older than 60 s now
    assert [budget.take() for _ in range(4)] == [True, True, True, False]


# ---- the Worker -------------------------------------------------------------------------------
@asynccontextmanager
async def worker_on(source: ModelSource, name: str, faults: Faults | None = None) -> AsyncIterator[WorkerHandle]:
    cfg = engine_config(None, dtype="float32", num_kv_blocks=16, max_model_len=64,
                        torch_threads=1).resolve(source.config)
    worker = Worker(source, cfg, name, faults)
    assert device_threads(f"{name}-device") == [], "a Worker built but not run holds no thread"
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(worker.run)
        yield handle
        handle.close()
    assert device_threads(f"{name}-device") == []
    assert handle.snapshot().state == "stopped"


def one_step(source: ModelSource) -> StepBatch:
    params = SamplingParams(temperature=0, max_tokens=4)
    seq = Sequence("r", 0, [5, 6, 7], 3, params)
    row = SampleRow(params=params, generator=None, prompt_ids=None, output_ids=None, num_output_tokens=0)
    return StepBatch([BatchItem(seq.seq_id, [5, 6, 7], 0, [0], row)])


async def test_a_worker_answers_through_its_handle_and_rebuilds_within_its_budget(tiny_source: ModelSource) -> None:
    async with worker_on(tiny_source, "w-flaky", Faults(at_step=2, times=100)) as worker:
        snap = worker.snapshot()
        assert (snap.state, snap.context_builds, snap.inbox_depth) == ("ready", 1, 0)
        first = await worker.execute(one_step(tiny_source))
        assert len(first.sampled.token_ids) == 1
        with pytest.raises(InjectedFault):  # the step's own exception, in the caller
            await worker.execute(one_step(tiny_source))
        assert not await worker.healthy()
        for build in (2, 3, 4):
            assert await worker.restart()
            assert (worker.snapshot().state, worker.snapshot().context_builds) == ("ready", build)
            assert await worker.healthy()
        assert not await worker.restart(), "a fourth rebuild within 60 s is refused"
        assert worker.snapshot().state == "failed"
    with pytest.raises(WorkerStopped):
        await worker.execute(one_step(tiny_source))
    assert not await worker.healthy()


async def test_a_rebuild_drops_the_old_context_before_building_the_next(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    # a rebuild must never need two models' memory at once, even right after the first build
    # (whose outcome carried the Context through the device thread)
    cfg = engine_config(None, dtype="float32", num_kv_blocks=16, max_model_len=64,
                        torch_threads=1).resolve(tiny_source.config)
    worker = Worker(tiny_source, cfg, "w-drop-first")
    built: list[weakref.ref[object]] = []
    old_alive_at_build: list[bool] = []
    real_context = worker_module.Context

    def building(*args: object) -> object:
        old_alive_at_build.append(any(ref() is not None for ref in built))
        ctx = real_context(*args)  # type: ignore[arg-type]
        built.append(weakref.ref(ctx))
        return ctx

    monkeypatch.setattr(worker_module, "Context", building)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(worker.run)
        assert await handle.restart()
        assert await handle.restart()
        handle.close()
    assert old_alive_at_build == [False, False, False] and len(built) == 3

async def test_a_context_frozen_with_the_heap_is_freed_when_rebuilt(tiny_source: ModelSource) -> None:
    # python -m atomr_trio freezes its heap once it listens (executor/gc_heap.py): the Contexts alive
    # then are frozen too, and a reference cycle through one would outlive it unless the Worker's
    # collection before a rebuild reaches frozen objects
    cfg = engine_config(None, dtype="float32", num_kv_blocks=16, max_model_len=64,
                        torch_threads=1).resolve(tiny_source.config)
    worker = Worker(tiny_source, cfg, "w-frozen")

    def frozen_in_a_cycle() -> weakref.ref[object]:
        ctx = worker.context
        assert ctx is not None
        ctx.cycle = ctx  # type: ignore[attr-defined]
        gc_heap.freeze()
        return weakref.ref(ctx)

    assert not gc_heap.frozen() and gc.get_freeze_count() == 0
    try:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(worker.run)
            first = frozen_in_a_cycle()
            assert await handle.restart()
            assert first() is None and worker.context is not None
            assert gc_heap.frozen() and gc.get_freeze_count() > 0, "what survived is frozen again"
            assert len((await handle.execute(one_step(tiny_source))).sampled.token_ids) == 1
            handle.close()
    finally:
        gc_heap.thaw()
    assert gc.get_freeze_count() == 0
