"""Recovery: what an engine does when a step fails — tell a broken device Context from a request
whose contents broke the step, and act on it.

Invariants:
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

from ..executor.model_runner import BatchItem, StepBatch
from ..executor.worker_handle import WorkerHandle
from .block_manager import BlockManager
from .engine_stats import EngineStats
from .request_table import RequestTable
from .scheduler import Scheduled, Scheduler
from .step_io import ResultApplier

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

    async def isolate(self, scheduled: list[Scheduled], items: list[BatchItem], error: Exception) -> bool:
        """A step failed. If the Context is broken, rebuild it (`recover`) and return False.
        Otherwise the batch's contents are at fault: run each sequence alone, end the requests
        whose sequence fails again with an error, apply the others' results, and return True."""
        if not await self.worker.healthy():
            await self.recover(error)
            return False
        log.warning("%s: a step failed (%s: %s); running its %d sequences one at a time",
                    self.name, type(error).__name__, error, len(items))
        for s, item in zip(scheduled, items, strict=True):
            if s.seq.is_finished:
                continue
            if len(items) > 1:
                try:
                    result = await self.worker.execute(StepBatch([item]))
                except Exception as e:  # noqa: BLE001
                    error = e
                else:
                    self.results.apply([s], [item], result)
                    continue
                if not await self.worker.healthy():
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
