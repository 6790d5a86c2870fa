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
- Outcomes reach the Trio thread in job order, even while its owner is cancelled. A job's outcome
  is handed over when the next job calls its `hand_over` (a model step: once its inputs are built,
  right before its layers run), when the next job returns, or at once when no job is queued
  behind it.

Why the hand-over waits for the next job's launch: the Trio thread takes the GIL as soon as it
wakes and keeps it for the outcome's Python (a step's results, SSE writes, the next schedule).
Woken before the device thread's own Python of the next step (filling in tokens, building its
inputs), that Python waited for the GIL: at 16 concurrent decodes on 2 cores ~2.7 ms of wall per
step for ~0.5 ms of CPU, a tenth of the step. Woken as the layers start, the Trio thread works
while the device computes — wholly so where the layers are one native call that lets the GIL go
(the CPU decode step, `LlamaModel.fused_decode`); a layer loop in Python (prefill chunks, mixed
steps, the torch path) still shares the GIL with it between ops. For the same reason the wake-up
byte is written with the GIL held (`_Mailbox`): a write that lets the GIL go hands it to the
woken thread then and there.

Measured level and not taken (64 concurrent, 128 in / 128 out, default model, 2-core Zen 5, 2
alternated rounds): pinning the device thread and its OpenMP worker to one core each, the Trio
thread left free (985 / 1034 vs 985 / 1045 tok/s); a GIL switch interval of 0.5 ms instead of
5 (1027 / 1002 vs 1039 / 1012). OMP_PROC_BIND binds the process's first thread, the Trio
thread, to the device thread's core: 627-645 tok/s.
"""

from __future__ import annotations

import collections
import ctypes
import queue
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

from ..engine.nurseries import unwrapped

T = TypeVar("T")

_Deliver = Callable[[outcome.Outcome[Any]], None]
_Job = tuple[Callable[[Callable[[], None]], Any], _Deliver]  # fn(hand_over), deliver


class DeviceThreadClosed(RuntimeError):
    """A job was submitted after the device thread's block was left."""


class _Mailbox:
    """Finished jobs' outcomes on their way from the device thread to the Trio thread: a queue,
    and a byte on a socket pair that wakes the Trio task delivering them (`serve`)."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[_Deliver, outcome.Outcome[Any]]] = collections.deque()
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._wake = _wake_holding_the_gil(self._write)

    def post(self, deliver: _Deliver, result: outcome.Outcome[Any]) -> None:
        """On the device thread: queue the outcome, then wake the Trio thread."""
        self._items.append((deliver, result))
        self._wake()

    def deliver_all(self) -> None:
        """On the Trio thread: deliver what is queued, in order."""
        while self._items:
            deliver, result = self._items.popleft()
            deliver(result)

    async def serve(self) -> None:
        """Deliver outcomes as they are posted, until cancelled. The byte is read before the queue
        is emptied, so an outcome posted meanwhile leaves a byte behind: no wake-up is lost."""
        while True:
            await trio.lowlevel.wait_readable(self._read)
            try:
                self._read.recv(4096)
            except BlockingIOError:
                pass
            self.deliver_all()

    def close(self) -> None:
        self._read.close()
        self._write.close()


def _wake_holding_the_gil(sock: socket.socket) -> Callable[[], None]:
    """A one-byte write to `sock` through the C library's write(2), called with the GIL held
    (ctypes.PyDLL); where that cannot be had, `sock.send` (which lets the GIL go). A full buffer
    (EAGAIN) loses nothing: the bytes in it are a pending wake-up."""
    fd = sock.fileno()
    try:
        write = ctypes.PyDLL(None).write
    except (OSError, AttributeError, TypeError):  # no C library to call into (Windows)
        def send() -> None:
            try:
                sock.send(b"\0")
            except BlockingIOError:
                pass

        return send
    write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t

    def wake() -> None:
        write(fd, b"\0", 1)

    return wake


class DeviceThread:
    """Made by `open_device_thread` only; `run` and `submit` are all its users call."""

    def __init__(self, name: str, num_threads: int | None) -> None:
        self.name = name
        self.num_threads = num_threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._mailbox = _Mailbox()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False

    def _main(self) -> None:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        held: tuple[_Deliver, outcome.Outcome[Any]] | None = None  # the last outcome, not yet posted

        def hand_over() -> None:
            nonlocal held
            if held is not None:
                self._mailbox.post(*held)
                held = None

        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:  # nothing queued behind the last job: its outcome goes now
                hand_over()
                job = self._jobs.get()
            if job is None:
                hand_over()
                return
            fn, deliver = job
            result = outcome.capture(fn, hand_over)
            hand_over()  # the job did not call it
            held = (deliver, result)
            # Only `held` keeps the outcome now: once it is posted, nothing here pins what the job
            # returned while the next job runs (a Context built by the last job, say, that the next
            # one drops before building its successor).
            del job, fn, deliver, result

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn() on the device thread and return its result (or raise its exception)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller submits nothing
        if self._closed:
            raise DeviceThreadClosed(f"{self.name} is closed")
        task = trio.lowlevel.current_task()
        self._jobs.put((lambda _: fn(), lambda result: trio.lowlevel.reschedule(task, result)))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # wait for the job; the cancel lands afterwards

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def submit(self, fn: Callable[[Callable[[], None]], T], deliver: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue fn(hand_over) behind the jobs already queued, without waiting for it; `deliver`
        gets its outcome on the Trio thread. fn calls `hand_over()` once its own Python before the
        long part is done, if it has such a part: the outcome of the job before it goes to the
        Trio thread then. The caller's task may end meanwhile: the job still runs."""
        if self._closed:
            raise DeviceThreadClosed(f"{self.name} is closed")
        self._jobs.put((fn, deliver))

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
    # Shielded: a cancelled owner's tasks still get the outcomes of the jobs they wait for (a
    # waiter is never abandoned mid-job), so delivery stops only once the thread is joined.
    delivering = trio.CancelScope(shield=True)

    async def deliver() -> None:
        with delivering:
            await thread._mailbox.serve()

    try:
        with unwrapped():  # the mailbox's nursery is the thread's own business
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver)
                thread._start()
                try:
                    yield thread
                finally:
                    await thread._close()
                    thread._mailbox.deliver_all()  # what the last jobs posted
                    delivering.cancel()
    finally:
        thread._mailbox.close()


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

