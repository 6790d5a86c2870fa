"""Worker: the actor that owns one device — a Trio task with an inbox, its DeviceThread and
the restartable Context under it.

Invariants:
- The Worker lives as long as its EngineCore, which talks to it only through its
  `WorkerHandle`; the Context holds everything a device failure can poison (weights, KV
  tensors) and is rebuilt from the model source, within the restart budget, without the engine
  noticing anything but lost KV contents.
- All torch work of the device runs on the Worker's DeviceThread, one job at a time. The thread
  runs exactly while `Worker.run` does, so a Worker that was built but never run holds no thread.
- Messages are answered one at a time, in order; every message is answered, or its reply
  channel closed when the Worker stops. A step (Execute) is queued on the device thread without
  waiting for it, so the next step can be queued behind it while it runs; its answer comes when
  it has run. A step that `follows` gets the previous step's sampled tokens in place of its
  PLACEHOLDERs on the device thread, and fails with PredecessorFailed, unrun, when that step failed.
- `state` changes only in `_move`, which refuses illegal transitions; the Worker publishes a
  fresh WorkerSnapshot on its Board after every change, with the bytes its Context holds on
  the device (`context_bytes`, counted once per build).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import outcome
import torch
import trio

from ..engine.engine_config import EngineConfig
from ..engine.messages import Board, reply
from ..model_source import ModelSource
from . import gc_heap
from .context import Context, InjectedFault
from .device_memory import held_bytes
from .device_thread import DeviceThread, open_device_thread
from .failures import classify
from .model_runner import StepBatch, StepResult, fill_placeholders
from .worker_handle import CheckHealth, Execute, PredecessorFailed, WorkerHandle, WorkerMessage, WorkerSnapshot

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # Context rebuilds allowed ...
RESTART_WINDOW_S = 60.0  # ... within this many seconds
INBOX_SIZE = 16  # the engine sends one message and awaits its answer before the next

_MOVES = {
    "starting": {"ready", "stopped"},
    "ready": {"rebuilding", "failed", "stopped"},
    "rebuilding": {"ready", "failed", "stopped"},
    "failed": {"stopped"},
    "stopped": set[str](),
}


@dataclass(frozen=True)
class Faults:
    """Test hooks. kind "fault": each of the first `times` Contexts fails at its `at_step`-th
    step and stays broken (a sticky device error). kind "oom": counting only the steps whose
    batch has more than `over_seqs` sequences, the `at_step`-th such step and the `times - 1`
    after it raise torch.OutOfMemoryError before computing anything; the Context stays healthy."""

    at_step: int | None = None
    times: int = 1
    kind: Literal["fault", "oom"] = "fault"
    over_seqs: int = 0

    def context_fault(self, builds: int) -> int | None:
        """The step at which the Context built after `builds` others breaks, if any."""
        return self.at_step if self.kind == "fault" and builds < self.times else None


class OomInjector:
    """The "oom" kind of Faults, across Contexts; used on the device thread only."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.steps = 0  # steps whose batch was large enough to count

    def check(self, batch: StepBatch) -> None:
        f = self.faults
        if f.kind != "oom" or f.at_step is None or len(batch.items) <= f.over_seqs:
            return
        self.steps += 1
        if f.at_step <= self.steps < f.at_step + f.times:
            raise torch.OutOfMemoryError(f"injected out of memory at step {self.steps} "
                                         f"({len(batch.items)} sequences)")


class RestartBudget:
    """At most `limit` Context rebuilds within any `window_s` seconds."""

    def __init__(self, limit: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._spent: deque[float] = deque()

    def take(self) -> bool:
        """Spend one rebuild now; False (nothing spent) when the window's rebuilds are used up."""
        now = self._clock()
        while self._spent and now - self._spent[0] > self.window_s:
            self._spent.popleft()
        if len(self._spent) >= self.limit:
            return False
        self._spent.append(now)
        return True


class Worker:
    def __init__(self, source: ModelSource, cfg: EngineConfig, name: str, faults: Faults | None = None) -> None:
        self.source = source
        self.cfg = cfg
        self.name = name
        self.faults = faults or Faults()
        self._oom = OomInjector(self.faults)
        self.context: Context | None = None  # set and dropped on the device thread only
        self.state = "starting"
        self.num_context_builds = 0
        self._memory_bytes: int | None = None  # the Context's, counted on the device thread
        self._sampled: dict[int, int] | None = None  # the last step's tokens by seq_id (device thread); None: it failed
        self.budget = RestartBudget()
        self._thread: DeviceThread | None = None
        self._send, self._inbox = trio.open_memory_channel[WorkerMessage](INBOX_SIZE)
        self._board = Board(self._snapshot())
        self.handle = WorkerHandle(name, self._send, self._board)

    # ---- the actor ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[WorkerHandle] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the device thread, build the first Context (its failure is raised here, before
        `started`), then answer messages until the handle is closed or this task is cancelled.
        The thread is joined however this ends."""
        try:
            async with open_device_thread(f"{self.name}-device", self.cfg.torch_threads) as thread:
                self._thread = thread
                await self._build()
                task_status.started(self.handle)
                async for msg in self._inbox:
                    self._publish()  # the inbox is one shorter
                    await self._answer(msg)
        finally:
            self._thread = None
            self.context = None  # the thread is joined: no job can hold it
            self._close_inbox()
            self._move("stopped")

    async def _answer(self, msg: WorkerMessage) -> None:
        if isinstance(msg, Execute):
            self._execute(msg)
        elif isinstance(msg, CheckHealth):
            reply(msg.reply, await self._healthy())
        else:
            reply(msg.reply, await self._rebuild())

    def _close_inbox(self) -> None:
        """Stop taking messages; the callers of any still queued hear that the Worker stopped."""
        self._inbox.close()
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            msg.reply.close()

    # ---- the device work ----------------------------------------------------------------------
    def _device(self) -> DeviceThread:
        assert self._thread is not None, "the Worker is not running"
        return self._thread

    def _execute(self, msg: Execute) -> None:
        """Queue the step on the device thread; its outcome is the answer."""
        ctx = self.context  # None only while a Context is built or after the Worker failed

        def answer(result: outcome.Outcome[StepResult]) -> None:
            if isinstance(result, outcome.Error):
                log.debug("%s: step failed", self.name, exc_info=result.error)
                # the traceback's frames hold the Context: a rebuild could not free its weights and cache
                result.error.__traceback__ = None
            reply(msg.reply, result)

        self._device().submit(lambda hand_over: self._follow(ctx, msg.batch, hand_over), answer)

    def _follow(self, ctx: Context | None, batch: StepBatch, on_launch: Callable[[], None]) -> StepResult:
        """On the device thread: fill in the previous step's tokens, run the step, keep its tokens.
        `on_launch` (the DeviceThread's hand-over) runs once the step's inputs are built, right
        before its layers."""
        try:
            if ctx is None:
                raise RuntimeError(f"{self.name}: no device context")
            if batch.follows:
                if self._sampled is None:
                    raise PredecessorFailed(f"{self.name}: the step this one follows failed")
                batch = fill_placeholders(batch, self._sampled)
            result = self._step(ctx, batch, on_launch)
        except BaseException:
            self._sampled = None
            raise
        self._sampled = dict(zip(result.seq_ids, result.sampled.token_ids, strict=True))
        return result

    def _step(self, ctx: Context, batch: StepBatch, on_launch: Callable[[], None]) -> StepResult:
        """One step on the device thread. Out of memory, the step's tensors are let go (the
        traceback's frames hold them) and the allocator's cached blocks go back to the device
        before the error travels to the engine, which retries a smaller batch."""
        try:
            self._oom.check(batch)
            return ctx.execute(batch, on_launch)
        except Exception as e:
            if classify(e) != "oom":
                raise
            e.__traceback__ = None
            release_cached_memory(self.cfg.device)
            raise

    async def _healthy(self) -> bool:
        ctx = self.context
        if ctx is None:
            return False
        try:
            return await self._device().run(ctx.healthy)
        except Exception:  # noqa: BLE001 - any error here means the device context is gone
            return False

    async def _rebuild(self) -> outcome.Outcome[bool]:
        """Rebuild a failed Context if the restart budget allows; False when it is spent (the
        Worker is failed then: it keeps its broken Context and rebuilds no more)."""
        if self.state == "failed" or not self.budget.take():
            self._move("failed")
            return outcome.Value(False)
        try:
            await self._build()
        except Exception as e:  # noqa: BLE001 - raised in the engine, as a failed build always was
            self._move("failed")
            return outcome.Error(e)
        return outcome.Value(True)

    async def _build(self) -> None:
        """(Re)create the Context on the device thread; the old one is dropped first."""
        inject = self.faults.context_fault(self.num_context_builds)

        def build() -> tuple[Context, int]:
            self.context = None
            self._sampled = None
            gc_heap.collect()  # a cycle through a frozen Context is freed too
            ctx = Context(self.source, self.cfg, inject)
            return ctx, context_bytes(ctx)

        if self.num_context_builds:
            self._move("rebuilding")
        ctx, self._memory_bytes = await self._device().run(build)
        self.context = ctx
        if self.cfg.kv_from_gpu_memory:  # rebuilt Contexts keep the measured cache: the engine's blocks match it
            self.cfg = self.cfg.model_copy(update={"num_kv_blocks": ctx.num_kv_blocks,
                                                   "kv_from_gpu_memory": False})
        self.num_context_builds += 1
        self._move("ready")
        if ctx.plan is not None:
            log.info("%s", ctx.plan.describe())
        if ctx.memory is not None:
            log.info("%s: %s", self.name, ctx.memory.describe())
        log.info("%s: context ready (build %d)", self.name, self.num_context_builds)

    # ---- state and views ----------------------------------------------------------------------
    def _move(self, to: str) -> None:
        if to != self.state:
            if to not in _MOVES[self.state]:
                raise RuntimeError(f"{self.name}: a Worker cannot go from {self.state} to {to}")
            self.state = to
        self._publish()

    def _publish(self) -> None:
        self._board.publish(self._snapshot())

    def _snapshot(self) -> WorkerSnapshot:
        ctx = self.context
        return WorkerSnapshot(self.name, self.cfg.device, self.state, self.num_context_builds,
                              self._send.statistics().current_buffer_used,
                              ctx.kernels if ctx is not None else "torch",
                              ctx.num_kv_blocks if ctx is not None else None,
                              self._memory_bytes if ctx is not None else None)


def context_bytes(ctx: Context) -> int:
    """The bytes a Context holds on its device: its KV cache and every tensor its model holds
    (weights, packed copies of them, rope tables), each storage counted once."""
    return held_bytes(ctx.runner.kv_cache, ctx.runner.model)


def release_cached_memory(device: str) -> None:
    """Give the caching allocator's unused blocks back to the device (CUDA; nothing on CPU)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Context", "Faults", "InjectedFault", "RestartBudget", "Worker", "WorkerHandle", "WorkerSnapshot"]
