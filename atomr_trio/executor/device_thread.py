"""DeviceThread: one long-lived OS thread per device that runs torch work for Trio tasks.

Invariants:
- The OS thread exists exactly while `open_device_thread`'s block runs: it is started on entry
  and joined on exit (off the Trio thread, shielded), so building the objects that will use it
  starts nothing, and leaving the block leaves no thread behind.
- Jobs run one at a time, in order, on the same OS thread, so torch's per-thread settings
  (`torch.set_num_threads`) hold for every job, and a job submitted after another sees all of
  its effects (the Worker queues step N+1 while step N runs).
- A task that is already cancelled submits no job. A Trio task awaiting a job is never abandoned
  mid-job: cancellation takes effect once the job returns, so device state is never touched by
  two jobs at once, and the thread is idle whenever its owner can leave the block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class DeviceThreadClosed(RuntimeError):
    """A job was submitted after the device thread's block was left."""


class DeviceThread:
    """Made by `open_device_thread` only; `run` is all its users call."""

    def __init__(self, name: str, num_threads: int | None) -> None:
        self.name = name
        self.num_threads = num_threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False

    def _main(self) -> None:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn() on the device thread and return its result (or raise its exception)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller submits nothing
        if self._closed:
            raise DeviceThreadClosed(f"{self.name} is closed")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the Trio run is gone; nobody waits any more
                pass

        self._jobs.put((fn, deliver))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # wait for the job; the cancel lands afterwards

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def submit(self, fn: Callable[[], T], deliver: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue fn() behind the jobs already queued, without waiting for it; `deliver` gets its
        outcome on the Trio thread. The caller's task may end meanwhile: the job still runs."""
        if self._closed:
            raise DeviceThreadClosed(f"{self.name} is closed")
        token = trio.lowlevel.current_trio_token()

        def done(result: outcome.Outcome[Any]) -> None:
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                pass

        self._jobs.put((fn, done))

    def _start(self) -> None:
        self._thread.start()

    async def _close(self) -> None:
        """Let the thread finish the jobs already queued, then join it without blocking the Trio
        thread; shielded, so a cancelled owner still leaves no thread behind."""
        self._closed = True
        self._jobs.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)


@asynccontextmanager
async def open_device_thread(name: str, num_threads: int | None) -> AsyncIterator[DeviceThread]:
    """A running DeviceThread for the block's duration (named `name`; `num_threads`: torch's
    intra-op threads on it, None to keep torch's default)."""
    thread = DeviceThread(name, num_threads)
    thread._start()
    try:
        yield thread
    finally:
        await thread._close()


async def run_on_own_thread(fn: Callable[[], T], name: str) -> T:
    """fn() on an OS thread started for it and joined after it: for torch work off the device
    thread (the kernel probes of `EngineConfig.resolve`). OpenMP keeps a pool of worker threads
    for every thread that ever ran a parallel region, for as long as that thread lives, and once
    the process has more such threads than CPUs, idle workers stop spinning between regions: a
    decode step of the default model at batch 16 on 2 cores took 26 ms alone and 53-69 ms beside
    one idle thread that had run a single matmul (a pooled `trio.to_thread` worker does). A
    thread that ends takes its pool with it."""
    async with open_device_thread(name, None) as thread:
        return await thread.run(fn)

