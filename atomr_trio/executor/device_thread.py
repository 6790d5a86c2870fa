"""DeviceThread: one long-lived OS thread per device that runs torch work for Trio tasks.

Invariants:
- Jobs run one at a time, in order, on the same OS thread, so torch's per-thread settings
  (`torch.set_num_threads`) hold for every job.
- A Trio task awaiting a job is never abandoned mid-job: cancellation takes effect once the job
  returns, so device state is never touched by two jobs at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class DeviceThread:
    def __init__(self, name: str, num_threads: int | None) -> None:
        self.name = name
        self.num_threads = num_threads
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[outcome.Outcome], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

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
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the Trio run is gone; nobody waits any more
                pass

        self._jobs.put((fn, deliver))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # wait for the job; the cancel lands afterwards

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def stop(self) -> None:
        """Ask the thread to exit after the jobs already queued; does not wait."""
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
