"""EngineCore: the actor that owns a scheduler, a block manager and a Worker, and runs the step loop.

Invariants:
- One Trio task reads the inbox and steps, so scheduler and block state change only between
  steps: an `AbortRequest` handled before a step has freed its blocks before that step runs.
- Results go to each request's Outbox with a non-blocking push: a slow consumer never stalls
  the loop.
- An AddRequest the engine cannot serve ends with an error delta; it never raises in the loop.
  When the loop ends for any reason, every live request gets a final delta ("abort", or
  "error" when the engine failed).
- The Worker is a task of the engine's own nursery, started by `run` and ended with it; the
  engine talks to it only through its WorkerHandle. Building an EngineCore starts no task and
  no thread.
- The loop never polls: it steps while there is work and otherwise waits for the next message.
- Async scheduling (`async_scheduling`, on by default): while step N runs on the device thread
  the loop applies step N-1 and schedules and submits step N+1, whose decode rows take N's
  sampled tokens as PLACEHOLDERs (step_io.launch; the Worker fills them in), so the device
  thread never waits for the Trio side. At most two steps are in flight, a step follows only one
  that `can_follow`, and results are applied in order. When a step fails, the steps behind it
  fail unrun (PredecessorFailed); all of them are taken back, latest first, and Recovery acts
  on the failed one with nothing in flight.
- `state` changes only in `_move`, which refuses illegal transitions; every change is published.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import trio

from ..executor.model_runner import BatchItem
from ..executor.worker import Faults, Worker
from ..executor.worker_handle import PendingStep
from ..model_source import ModelSource
from .block_manager import BlockManager
from .engine_config import EngineConfig
from .engine_handle import EngineHandle, EngineMessage, EngineSnapshot
from .engine_stats import EngineStats, StepReporter
from .messages import AbortAll, AbortRequest, Board
from .nurseries import unwrapped
from .recovery import EngineFailed, Recovery
from .reports import LoadSink, ReportSink
from .request_table import RequestTable
from .scheduler import Scheduled, Scheduler
from .step_io import ResultApplier, build_batch, can_follow, known_tokens, launch, take_back

log = logging.getLogger(__name__)

INBOX_SIZE = 1024

_MOVES = {
    "created": {"loading"},
    "loading": {"serving", "failed", "stopped"},
    "serving": {"restarting", "failed", "stopped"},
    "restarting": {"serving", "failed", "stopped"},
    "failed": set[str](),
    "stopped": set[str](),
}


@dataclass
class InFlight:
    """A step submitted to the Worker and not yet applied."""

    scheduled: list[Scheduled]
    items: list[BatchItem]
    num_tokens: int
    pending: PendingStep
    can_follow: bool  # the next step may be scheduled before this one returns
    started: float  # perf_counter before it was scheduled


class EngineCore:
    def __init__(self, source: ModelSource, cfg: EngineConfig, name: str = "engine-0",
                 model_name: str | None = None, metrics: ReportSink | None = None,
                 load_sink: LoadSink | None = None, faults: Faults | None = None) -> None:
        assert cfg.num_kv_blocks is not None and cfg.max_model_len is not None, "resolve cfg first"
        self.name = name
        self.source = source
        self.cfg = cfg
        self.state = "created"
        self.failure: str | None = None
        self.stats = EngineStats()
        self.reporter = StepReporter(model_name or source.name, name, metrics, load_sink)
        self._worker = Worker(source, cfg, name, faults)  # started by run(); a thread only then
        self.worker = self._worker.handle
        self._build_parts(cfg)
        self._send, self._inbox = trio.open_memory_channel[EngineMessage](INBOX_SIZE)
        self._flight: deque[InFlight] = deque()
        self._depth = 2 if cfg.async_scheduling else 1  # steps in flight at most
        self._landed = 0.0  # perf_counter when the last step was applied
        self._board = Board(self.snapshot())
        self.handle = EngineHandle(name, cfg, self._send, self._board, self.worker)

    def _build_parts(self, cfg: EngineConfig) -> None:
        """The parts sized by the KV cache. Built again, once, before serving when the Context
        measured a different number of blocks on its device (CUDA: memory_plan.py)."""
        assert cfg.num_kv_blocks and cfg.max_model_len and cfg.max_num_batched_tokens, "resolve cfg first"
        self.cfg = cfg
        window = self.source.config.window_of_every_layer
        self.block_manager = BlockManager(cfg.num_kv_blocks, cfg.resolved_block_size(), cfg.enable_prefix_caching,
                                          window=window)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_prefill_tokens)
        self.requests = RequestTable(self.scheduler, self.block_manager, cfg, self.source.config.vocab_size,
                                     self.stats, keep_records=self.reporter.wants_details)
        self.results = ResultApplier(self.requests, self.block_manager, self.stats, self.reporter,
                                     self.source.eos_token_ids, cfg.max_model_len)
        self.recovery = Recovery(self.name, self.worker, self.scheduler, self.block_manager, self.requests,
                                 self.results, self.stats, self._move)

    def _take_measured_cache(self) -> None:
        measured = self.worker.snapshot().num_kv_blocks
        if measured is not None and measured != self.cfg.num_kv_blocks:
            log.info("%s: %d KV blocks measured on %s (provisional: %s)", self.name, measured, self.cfg.device,
                     self.cfg.num_kv_blocks)
            self._build_parts(self.cfg.model_copy(update={"num_kv_blocks": measured, "kv_from_gpu_memory": False}))
            self.handle.config = self.cfg

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def waiting_prompt_tokens(self) -> int:
        return sum(s.num_tokens - s.num_pending - s.num_computed_tokens for s in self.scheduler.waiting)

    # ---- the actor ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[EngineHandle] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the Worker (it builds the first Context; a failure to build is raised here),
        then serve until cancelled. However this ends, the Worker has stopped and its device
        thread is joined before every live request gets its final delta."""
        self._move("loading")
        try:
            with unwrapped():  # the engine's nursery is its own business
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._worker.run)
                    self._take_measured_cache()
                    try:
                        self._move("serving")
                        self.reporter.started(self.block_manager)
                        task_status.started(self.handle)
                        await self._serve()
                    except EngineFailed as e:
                        self.failure = str(e)
                        raise
                    finally:
                        self.worker.close()  # the Worker ends after the job in flight, if any
        finally:
            self._move("failed" if self.failure else "stopped")
            self.requests.end_all(self.failure)
            self._publish()

    async def _serve(self) -> None:
        """Handle messages and step until the inbox closes; every message queued before a step
        is scheduled is handled before it.

        With work queued and nothing in flight, `schedule()` always picks something: each
        admitted request fits the KV cache alone (RequestTable._check), so the first running
        sequence can always grow once it has preempted the others, and with nothing running the
        first waiting one can always be admitted (a follower sample never sorts before its
        leader). Should it still pick nothing, the engine logs an error and waits for the next
        message (an abort or a new request changes what can be scheduled) instead of spinning."""
        stalled = False
        async with self._inbox:
            while True:
                if not self._flight and (stalled or not self.scheduler.has_work()):
                    self._report(0, 0, 0, 0)  # publish the idle state (aborts may have emptied it)
                    try:
                        self._handle(await self._inbox.receive())
                    except trio.EndOfChannel:
                        return
                self._drain_inbox()
                await self._launch()
                stalled = not self._flight and self.scheduler.has_work()
                if self._flight:
                    await self._land()
                elif stalled:
                    log.error("%s: nothing schedulable although work is queued; waiting for a message", self.name)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._handle(msg)

    def _handle(self, msg: EngineMessage) -> None:
        if isinstance(msg, AbortRequest):
            self.requests.abort(msg.request_id, msg.index, msg.outbox)
        elif isinstance(msg, AbortAll):
            self.requests.abort_all()
        else:
            self.requests.add(msg)

    async def _launch(self) -> None:
        """Schedule and submit steps while fewer than `_depth` are in flight and the last one
        in flight can be followed."""
        while len(self._flight) < self._depth and (not self._flight or self._flight[-1].can_follow):
            t0 = time.perf_counter()
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                return
            batch = build_batch(sched, follows=bool(self._flight))
            follow = can_follow(sched.scheduled)
            launch(sched.scheduled, batch.items, self.results.max_model_len)
            pending = await self.worker.submit(batch)
            self._flight.append(InFlight(sched.scheduled, batch.items, sched.num_tokens, pending, follow, t0))

    async def _land(self) -> None:
        """Wait for the oldest step in flight and apply it, or recover from its failure."""
        step = self._flight[0]
        prompt0, gen0 = self.stats.prompt_tokens, self.stats.generation_tokens
        try:
            result = await step.pending.result()
        except Exception as e:  # noqa: BLE001 - a request's contents or the device context failed
            if not await self._failed(e):
                return  # the Context was rebuilt: every sequence is queued for recomputation
        else:
            self._flight.popleft()
            self.results.apply(step.scheduled, step.items, result)
            self.scheduler.cap.succeeded()
        st = self.stats
        self._report(len(step.scheduled), step.num_tokens, st.prompt_tokens - prompt0, st.generation_tokens - gen0)
        now = time.perf_counter()
        st.steps += 1
        st.multi_seq_steps += len(step.scheduled) > 1
        st.step_s += now - max(step.started, self._landed)  # wall time the engine was busy with it
        self._landed = now

    async def _failed(self, error: Exception) -> bool:
        """The oldest step in flight failed: the ones behind it fail unrun; take them all back,
        latest first, then let Recovery act on the failed step with nothing in flight."""
        failed = self._flight[0]
        for later in list(self._flight)[1:]:
            try:
                await later.pending.result()  # PredecessorFailed: it did not run
            except Exception:  # noqa: BLE001, S110 - nothing of it is kept either way
                pass
        while self._flight:
            step = self._flight.pop()
            take_back(step.scheduled, step.items)
        return await self.recovery.step_failed(failed.scheduled, known_tokens(failed.scheduled, failed.items), error)

    def _report(self, num_scheduled: int, iteration_tokens: int, prompt: int, generated: int) -> None:
        self._publish()
        self.reporter.step(self.scheduler, self.block_manager, self.requests.take_records(),
                           num_scheduled, iteration_tokens, prompt, generated)

    def _move(self, to: str) -> None:
        if to != self.state:
            if to not in _MOVES[self.state]:
                raise RuntimeError(f"{self.name}: an engine cannot go from {self.state} to {to}")
            self.state = to
        self._publish()

    # ---- views ------------------------------------------------------------------------------
    def _batch_cap(self) -> tuple[int, int] | None:
        cap = self.scheduler.cap
        return (cap.num_seqs, cap.num_tokens) if cap.capped else None

    def _publish(self) -> None:
        self._board.publish(self.snapshot())

    def snapshot(self) -> EngineSnapshot:
        bm, st, worker = self.block_manager, self.stats, self.worker.snapshot()
        return EngineSnapshot(
            name=self.name, state=self.state, failure=self.failure, kernels=worker.kernels,
            num_requests=len(self.requests), num_requests_running=self.num_running,
            num_requests_waiting=self.num_waiting, waiting_prompt_tokens=self.waiting_prompt_tokens,
            inbox_depth=self._send.statistics().current_buffer_used,
            kv_cache_usage=bm.usage, num_kv_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            prefix_cache_evictions=bm.evictions, num_preemptions=self.scheduler.num_preemptions,
            context_restarts=st.context_restarts, request_failures=st.request_failures,
            oom_retries=st.oom_retries, batch_cap=self._batch_cap(), steps=st.steps,
            multi_seq_steps=st.multi_seq_steps, prompt_tokens=st.prompt_tokens,
            generation_tokens=st.generation_tokens, forward_s=st.forward_s, step_s=st.step_s,
            forward_share=st.forward_s / st.step_s if st.step_s else math.nan,
            worker=worker,
        )


__all__ = ["EngineCore", "EngineFailed", "EngineHandle", "EngineSnapshot", "EngineStats"]
