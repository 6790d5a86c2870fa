"""Recovery: what an engine does when a step fails — tell a device that ran out of memory, a
broken device Context and a request whose contents broke the step apart, and act on each.

Which failure it was (executor/failures.py `classify`):
- "oom" (torch.OutOfMemoryError): nothing is broken and no request is at fault. The step's
  results are dropped (none was applied), the Worker has already returned the allocator's
  cached memory to the device, the scheduler's BatchCap halves the batch (batch_cap.py) and
  preempts the running sequences past it (recomputed later), and the next step retries. Only a
  step of one sequence computing one token that still runs out of memory ends that request,
  with "out of memory on <device> with one sequence of N tokens: ...".
- "device" (a sticky CUDA error, torch.AcceleratorError, the test hook's InjectedFault): the
  Context is rebuilt at once (`recover`), without a health probe.
- "unknown": the Worker's health probe decides: a Context that no longer computes is rebuilt,
  otherwise the batch's sequences run one at a time to find the request at fault (`isolate`).

Invariants:
- An out-of-memory step costs no request unless one sequence alone, one token at a time, does
  not fit; every other request produces exactly the tokens it would have without the OOM.
- A failure the Context caused costs no request: the Context is rebuilt (within the Worker's
  restart budget: 3 rebuilds in 60 s) and every live sequence is recomputed from its tokens.
  Past the budget the engine fails (EngineFailed) and its supervisor sees it.
- A failure a request's contents caused ends that request alone, with an error; every other
  sequence of the failed batch gets its result, exactly as if the step had not failed.
- Re-running a sequence is safe: a step writes the same KV values to the same slots every time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..executor.failures import classify
from ..executor.model_runner import BatchItem, StepBatch
from ..executor.worker_handle import WorkerHandle
from .block_manager import BlockManager
from .engine_stats import EngineStats
from .request_table import RequestTable
from .scheduler import Scheduled, Scheduler
from .sequence import SeqStatus
from .step_io import ResultApplier, launch, take_back

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine cannot go on (its device context failed past the restart budget)."""


class Recovery:
    def __init__(self, name: str, worker: WorkerHandle, scheduler: Scheduler, block_manager: BlockManager,
                 table: RequestTable, results: ResultApplier, stats: EngineStats,
                 move: Callable[[str], None]) -> None:
        self.name = name
        self.worker = worker
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.table = table
        self.results = results
        self.stats = stats
        self.move = move  # the engine's state transition ("restarting", "serving")

    async def step_failed(self, scheduled: list[Scheduled], items: list[BatchItem], error: Exception) -> bool:
        """A step failed (taken back, nothing in flight, its items holding known tokens): act on
        its kind of failure. False when the Context was rebuilt (every sequence is queued for
        recomputation), True when the engine goes on with its queues."""
        kind = classify(error)
        if kind == "oom":
            self.out_of_memory(scheduled, error)
            return True
        if kind == "device" or not await self.worker.healthy():
            await self.recover(error)
            return False
        return await self.isolate(scheduled, items, error)

    def out_of_memory(self, scheduled: list[Scheduled], error: Exception) -> None:
        """Shrink the batch and let the next step retry; a lone one-token step ends its request."""
        self.stats.oom_retries += 1
        live = [s for s in scheduled if s.seq.status is SeqStatus.RUNNING]  # preempted ones lost nothing
        if not live:
            return
        num_tokens = sum(s.num_new_tokens for s in live)
        if len(live) == 1 and num_tokens <= 1:
            self._fail_out_of_memory(live[0], error)
            return
        cap = self.scheduler.cap
        cap.lower(len(live), num_tokens)
        shed = self.scheduler.shed(cap.num_seqs)
        log.warning("%s: out of memory on %s in a step of %d sequences and %d tokens (%s); preempted %d, "
                    "retrying with at most %d sequences and %d tokens a step",
                    self.name, self._device, len(live), num_tokens, error, len(shed), cap.num_seqs, cap.num_tokens)

    def _fail_out_of_memory(self, s: Scheduled, error: Exception) -> None:
        seq = s.seq
        message = (f"out of memory on {self._device} with one sequence of {seq.num_tokens} tokens "
                   f"({s.num_new_tokens} computed in the step): {error}")
        log.error("%s: request %s failed: %s", self.name, seq.request_id, message)
        self.stats.request_failures += 1
        self.table.fail(seq.request_id, message)

    @property
    def _device(self) -> str:
        return self.worker.snapshot().device

    async def isolate(self, scheduled: list[Scheduled], items: list[BatchItem], error: Exception) -> bool:
        """The batch's contents are at fault (the Context is healthy): run each sequence alone,
        end the requests whose sequence fails again with an error, apply the others' results,
        and return True. Should a sequence's re-run break the Context, rebuild it (`recover`)
        and return False; one that runs out of memory alone is left to the next step."""
        log.warning("%s: a step failed (%s: %s); running its %d sequences one at a time",
                    self.name, type(error).__name__, error, len(items))
        for s, item in zip(scheduled, items, strict=True):
            if s.seq.status is not SeqStatus.RUNNING:
                continue  # finished, or preempted while the step was in flight: recomputed from its tokens
            if len(items) > 1:
                launch([s], [item], self.results.max_model_len)
                try:
                    result = await self.worker.execute(StepBatch([item]))
                except Exception as e:  # noqa: BLE001
                    take_back([s], [item])
                    error = e
                else:
                    self.results.apply([s], [item], result)
                    continue
                kind = classify(error)
                if kind == "oom":  # not this request's fault: its step runs again next time
                    self.stats.oom_retries += 1
                    log.warning("%s: out of memory re-running request %s alone (%s)", self.name,
                                s.seq.request_id, error)
                    continue
                if kind == "device" or not await self.worker.healthy():
                    await self.recover(error)
                    return False
            log.error("%s: request %s failed: %s: %s", self.name, s.seq.request_id, type(error).__name__, error)
            self.stats.request_failures += 1
            self.table.fail(s.seq.request_id, f"internal error while processing this request "
                                              f"({type(error).__name__}); other requests were not affected")
        return True

    async def recover(self, error: Exception) -> None:
        """Rebuild the Context and recompute every request from its tokens, or raise EngineFailed
        once the Worker's restart budget is spent."""
        log.error("%s: device step failed: %s: %s", self.name, type(error).__name__, error)
        self.scheduler.requeue_all()
        self.block_manager.forget_contents()
        self.move("restarting")
        if not await self.worker.restart():
            raise EngineFailed(f"device context failed repeatedly ({type(error).__name__}: {error})") from error
        self.move("serving")
        self.stats.context_restarts += 1
