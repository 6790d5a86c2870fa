"""EngineCore: the actor that owns a scheduler, a block manager and a Worker, and runs the step loop.

Invariants:
- One Trio task reads the inbox and steps, so scheduler and block state change only between
  steps: an `AbortRequest` handled before a step has freed its blocks before that step runs.
- Results go to each request's Outbox with a non-blocking push: a slow consumer never stalls
  the loop.
- An AddRequest the engine cannot serve ends with an error delta; it never raises in the loop.
  When the loop ends for any reason, every live request gets a final delta ("abort").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ..executor.model_runner import BatchItem, PromptRows, StepBatch, StepResult
from ..executor.sampler import SampleRow, TokenLogprobs
from ..executor.worker import Faults, Worker, WorkerSnapshot
from ..model_source import ModelSource
from .block_manager import BlockManager
from .engine_config import EngineConfig
from .messages import AbortAll, AbortRequest, AddRequest, Board, RequestMetrics, SeqDelta
from .outbox import Outbox
from .reports import EngineInfo, FinishedRequest, LoadSink, ReportSink, StepReport
from .scheduler import Scheduled, Scheduler, SchedulerOutput
from .sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)

INBOX_SIZE = 1024


class EngineFailed(RuntimeError):
    """The engine cannot go on (its device context failed past the restart budget)."""


@dataclass
class EngineStats:
    steps: int = 0
    multi_seq_steps: int = 0  # steps whose batch carried more than one sequence
    prompt_tokens: int = 0  # prompt tokens computed (recomputation included)
    generation_tokens: int = 0
    forward_s: float = 0.0
    context_restarts: int = 0
    request_failures: int = 0  # requests ended by an error their own contents caused in a step
    step_s: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSnapshot:
    """What an EngineCore publishes about itself after every change (views read it; reading
    never blocks and never mutates)."""

    name: str
    state: str  # "created" | "loading" | "serving" | "restarting" | "failed" | "stopped"
    failure: str | None
    kernels: str
    num_requests: int  # live requests (any sample not finished)
    num_requests_running: int
    num_requests_waiting: int
    waiting_prompt_tokens: int  # prompt tokens not yet computed of the waiting sequences
    inbox_depth: int
    kv_cache_usage: float
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_evictions: int
    num_preemptions: int
    context_restarts: int
    request_failures: int
    steps: int
    multi_seq_steps: int
    prompt_tokens: int
    generation_tokens: int
    forward_s: float  # model forward seconds, in all
    step_s: float  # engine step seconds (schedule, forward, sampling, bookkeeping)
    forward_share: float
    worker: WorkerSnapshot

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineHandle:
    """What others hold of an EngineCore: messages to send, its resolved config and its latest
    snapshot. It cannot reach the engine's scheduler, blocks or worker."""

    def __init__(self, name: str, config: EngineConfig,
                 send: trio.MemorySendChannel[AddRequest | AbortRequest | AbortAll],
                 board: Board[EngineSnapshot]) -> None:
        self.name = name
        self.config = config
        self._send = send
        self._board = board

    async def add(self, req: AddRequest) -> None:
        await self._send.send(req)

    async def abort(self, request_id: str, index: int | None = None,
                    outbox: Outbox[SeqDelta] | None = None) -> None:
        """Idempotent; safe after the request finished and after the engine stopped. With `outbox`,
        only the request reporting to that outbox is aborted."""
        try:
            await self._send.send(AbortRequest(request_id, index, outbox))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def abort_all(self) -> None:
        """Ask the engine to end every live request with finish_reason "abort"."""
        try:
            await self._send.send(AbortAll())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def snapshot(self) -> EngineSnapshot:
        return self._board.read()


@dataclass
class _Live:
    seqs: list[Sequence]
    outbox: Outbox[SeqDelta]


class EngineCore:
    def __init__(self, source: ModelSource, cfg: EngineConfig, name: str = "engine-0",
                 model_name: str | None = None, metrics: ReportSink | None = None,
                 load_sink: LoadSink | None = None, faults: Faults | None = None) -> None:
        assert cfg.num_kv_blocks is not None and cfg.max_model_len is not None, "resolve cfg first"
        self.name = name
        self.model_name = model_name or source.name
        self.metrics = metrics
        self.load_sink = load_sink  # a DpCoordinator, when the engine is a replica
        self.cfg = cfg
        self.source = source
        self.vocab_size = source.config.vocab_size
        self.eos_token_ids = frozenset(source.eos_token_ids)
        self.block_manager = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.worker = Worker(source, cfg, name, faults)
        self.stats = EngineStats()
        self.state = "created"
        self.failure: str | None = None
        self._requests: dict[str, _Live] = {}
        self._finished: list[FinishedRequest] = []  # since the last metrics report
        self._itl: list[float] = []
        self._reported = (0, 0, 0)  # prefix queries, prefix hits, preemptions at the last report
        self._send, self._inbox = trio.open_memory_channel[AddRequest | AbortRequest | AbortAll](INBOX_SIZE)
        self._board = Board(self.snapshot())
        self.handle = EngineHandle(name, cfg, self._send, self._board)

    # ---- what other actors call (they only send messages) -----------------------------------
    async def add(self, req: AddRequest) -> None:
        await self.handle.add(req)

    async def abort(self, request_id: str, index: int | None = None,
                    outbox: Outbox[SeqDelta] | None = None) -> None:
        await self.handle.abort(request_id, index, outbox)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def waiting_prompt_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.waiting)

    # ---- the actor ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[EngineHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self.state = "loading"
        self._publish()
        try:
            await self.worker.start()
            self.state = "serving"
            self._publish()
            if self.metrics is not None:
                bm = self.block_manager
                self.metrics.report(EngineInfo(self.model_name, self.name, bm.block_size, bm.num_blocks,
                                               bm.enable_prefix_caching))
            task_status.started(self.handle)
            async with self._inbox:
                while True:
                    if not self.scheduler.has_work():
                        self._report(0, 0, 0, 0)  # publish the idle state (aborts may have emptied it)
                        try:
                            self._handle(await self._inbox.receive())
                        except trio.EndOfChannel:
                            return
                    self._drain_inbox()
                    if self.scheduler.has_work():
                        await self._step()
        finally:
            self.state = "failed" if self.failure else "stopped"
            for rid in list(self._requests):
                if self.failure:
                    for seq in self._requests[rid].seqs:
                        self._fail(seq, self.failure)
                else:
                    self._abort(rid, None, reason="abort")
            self.worker.close()
            self._publish()

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._handle(msg)

    def _handle(self, msg: AddRequest | AbortRequest | AbortAll) -> None:
        if isinstance(msg, AbortRequest):
            live = self._requests.get(msg.request_id)
            if live is not None and msg.outbox is not None and live.outbox is not msg.outbox:
                return  # another owner's request under the same id
            self._abort(msg.request_id, msg.index, reason="abort")
            return
        if isinstance(msg, AbortAll):
            for rid in list(self._requests):
                self._abort(rid, None, reason="abort")
            return
        try:
            self._check(msg)
        except ValueError as e:
            for i in range(msg.params.n):
                msg.outbox.push(SeqDelta(i, [], None, "error", error=str(e)))
            return
        seqs: list[Sequence] = []
        for i in range(msg.params.n):
            seq = Sequence(msg.request_id, i, list(msg.prompt_token_ids), len(msg.prompt_token_ids),
                           msg.params, leader=seqs[0] if seqs else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[msg.request_id] = _Live(seqs, msg.outbox)

    def _check(self, msg: AddRequest) -> None:
        ids, cfg = msg.prompt_token_ids, self.cfg
        assert cfg.max_model_len is not None and cfg.num_kv_blocks is not None
        if msg.request_id in self._requests:
            raise ValueError(f"request id {msg.request_id!r} is already in use")
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= cfg.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the maximum context length is {cfg.max_model_len}"
            )
        msg.params.check_for_model(self.vocab_size)
        asked = msg.params.max_tokens
        longest = min(len(ids) + (cfg.max_model_len if asked is None else asked), cfg.max_model_len)
        if self.block_manager.blocks_for(longest) > cfg.num_kv_blocks:
            raise ValueError(
                f"the request needs up to {longest} tokens of KV cache; this engine holds "
                f"{cfg.num_kv_blocks * cfg.block_size}"
            )

    def _abort(self, request_id: str, index: int | None, reason: str) -> None:
        live = self._requests.get(request_id)
        if live is None:
            return  # finished already, or never known: aborts are idempotent
        for seq in live.seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self.scheduler.finish(seq, reason)
                live.outbox.push(SeqDelta(seq.index, [], None, reason, metrics=_metrics(seq)))
                self._count_finish(reason)
        if all(s.is_finished for s in live.seqs):
            self._request_done(live)

    # ---- the step ---------------------------------------------------------------------------
    async def _step(self) -> None:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            log.error("%s: nothing schedulable although work is queued", self.name)
            await trio.sleep(0.01)
            return
        batch = self._batch(sched)
        prompt0, gen0 = self.stats.prompt_tokens, self.stats.generation_tokens
        try:
            result = await self.worker.execute(batch)
        except Exception as e:  # noqa: BLE001 - a request's contents or the device context failed
            if not await self._isolate(sched.scheduled, batch.items, e):
                return
        else:
            self._apply(sched.scheduled, batch.items, result)
            self.stats.forward_s += result.forward_s
        st = self.stats
        self._report(len(sched.scheduled), sched.num_tokens, st.prompt_tokens - prompt0,
                     st.generation_tokens - gen0)
        st.steps += 1
        st.multi_seq_steps += len(sched.scheduled) > 1
        st.step_s += time.perf_counter() - t0

    async def _isolate(self, scheduled: list[Scheduled], items: list[BatchItem], error: Exception) -> bool:
        """A step failed. If the Context is broken, rebuild it (`_recover`) and return False.
        Otherwise the batch's contents are at fault: run each sequence alone, end the requests
        whose sequence fails again with an error, apply the others' results, and return True.
        Re-running is safe: a step writes the same KV values to the same slots every time."""
        if not await self.worker.healthy():
            await self._recover(error)
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
                    self._apply([s], [item], result)
                    self.stats.forward_s += result.forward_s
                    continue
                if not await self.worker.healthy():
                    await self._recover(error)
                    return False
            log.error("%s: request %s failed: %s: %s", self.name, s.seq.request_id, type(error).__name__, error)
            self.stats.request_failures += 1
            live = self._requests.get(s.seq.request_id)
            for seq in live.seqs if live else []:
                self._fail(seq, f"internal error while processing this request ({type(error).__name__}); "
                                "other requests were not affected")
        return True

    async def _recover(self, error: Exception) -> None:
        """Rebuild the Context and recompute every request from its tokens, or give up (and let
        the supervisor see the engine fail) once the restart budget is spent."""
        log.error("%s: device step failed: %s: %s", self.name, type(error).__name__, error)
        self.scheduler.requeue_all()
        self.block_manager.forget_contents()
        if not self.worker.can_restart():
            self.failure = f"device context failed repeatedly ({type(error).__name__}: {error})"
            raise EngineFailed(self.failure) from error
        self.state = "restarting"
        self._publish()
        await self.worker.restart()
        self.state = "serving"
        self.stats.context_restarts += 1

    def _batch(self, sched: SchedulerOutput) -> StepBatch:
        items = []
        for s in sched.scheduled:
            seq, c, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            row = None
            if s.samples and seq.params.max_tokens != 0:  # max_tokens 0: score the prompt only
                p = seq.params
                need_history = p.uses_penalties
                row = SampleRow(
                    params=p,
                    generator=seq.generator,
                    prompt_ids=seq.token_ids[: seq.num_prompt_tokens] if need_history else None,
                    output_ids=seq.output_token_ids if need_history else None,
                    num_output_tokens=seq.num_output_tokens,
                )
            items.append(BatchItem(seq.seq_id, seq.token_ids[c : c + n], c, list(seq.block_table), row,
                                   _prompt_rows(seq, c, n)))
        return StepBatch(items)

    def _apply(self, scheduled: list[Scheduled], items: list[BatchItem], result: StepResult) -> None:
        row_of = {sid: j for j, sid in enumerate(result.seq_ids)}
        now = time.monotonic()
        for s, item in zip(scheduled, items, strict=True):
            seq = s.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += s.num_new_tokens
            prompt_end = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.stats.prompt_tokens += max(0, prompt_end - item.start)
            self.block_manager.cache_computed(seq)
            if seq.prompt_logprobs is not None:
                seq.prompt_logprobs.extend(result.prompt_logprobs.get(seq.seq_id, ()))
            if item.sample is None:
                if seq.params.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens:
                    self._finish_scored(seq)
                continue
            j = row_of[seq.seq_id]
            tok = result.sampled.token_ids[j]
            lp = result.sampled.logprobs[j]
            seq.token_ids.append(tok)
            seq.first_token = seq.first_token or now
            if seq.last_token is not None and self.metrics is not None:
                self._itl.append(now - seq.last_token)
            seq.last_token = now
            self.stats.generation_tokens += 1
            reason = self._finish_reason(seq, tok)
            live = self._requests[seq.request_id]
            live.outbox.push(SeqDelta(seq.index, [tok], [lp] if lp else None, reason,
                                      max(seq.num_cached_tokens, 0),
                                      metrics=_metrics(seq) if reason is not None else None,
                                      prompt_logprobs=_take_prompt_logprobs(seq)))
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._count_finish(reason)
                if all(x.is_finished for x in live.seqs):
                    self._request_done(live)

    def _finish_scored(self, seq: Sequence) -> None:
        """A max_tokens=0 sample computed its prompt: it ends ("length") without a token."""
        live = self._requests[seq.request_id]
        live.outbox.push(SeqDelta(seq.index, [], None, "length", max(seq.num_cached_tokens, 0),
                                  metrics=_metrics(seq), prompt_logprobs=_take_prompt_logprobs(seq)))
        self.scheduler.finish(seq, "length")
        self._count_finish("length")
        if all(x.is_finished for x in live.seqs):
            self._request_done(live)

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params  # the sampler forbids stop tokens before min_tokens
        if not p.ignore_eos and tok in self.eos_token_ids:
            return "stop"
        if p.stop_token_ids and tok in p.stop_token_ids:
            return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length"
        assert self.cfg.max_model_len is not None
        if seq.num_tokens >= self.cfg.max_model_len:
            return "length"
        return None

    def _fail(self, seq: Sequence, error: str) -> None:
        live = self._requests.get(seq.request_id)
        if live is None or seq.is_finished:
            return
        self.scheduler.finish(seq, "error")
        live.outbox.push(SeqDelta(seq.index, [], None, "error", error=error, metrics=_metrics(seq)))
        self._count_finish("error")
        if all(x.is_finished for x in live.seqs):
            self._request_done(live)

    def _count_finish(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _request_done(self, live: _Live) -> None:
        """All samples of a request finished: record its timings (monotonic, taken here)."""
        del self._requests[live.seqs[0].request_id]
        if self.metrics is None:
            return
        lead, now = live.seqs[0], time.monotonic()
        self._finished.append(FinishedRequest(
            reason=lead.finish_reason or "abort",
            prompt_tokens=lead.num_prompt_tokens,
            generation_tokens=sum(s.num_output_tokens for s in live.seqs),
            e2e_s=now - lead.arrival,
            queue_s=lead.first_scheduled - lead.arrival if lead.first_scheduled else None,
            ttft_s=lead.first_token - lead.arrival if lead.first_token else None,
            prefill_s=(lead.first_token - lead.first_scheduled
                       if lead.first_token and lead.first_scheduled else None),
            decode_s=now - lead.first_token if lead.first_token else None,
            n=len(live.seqs),
            max_tokens=lead.params.max_tokens,
            max_generation_tokens=max(s.num_output_tokens for s in live.seqs),
        ))

    def _report(self, num_scheduled: int, iteration_tokens: int, prompt: int, generated: int) -> None:
        self._publish()
        bm = self.block_manager
        if self.load_sink is not None:
            self.load_sink.report_load(self.name, self.num_running + self.num_waiting + bm.usage)
        if self.metrics is None:
            return
        counts = (bm.prefix_queries, bm.prefix_hits, self.scheduler.num_preemptions)
        q, h, p = (a - b for a, b in zip(counts, self._reported, strict=True))
        self._reported = counts
        self.metrics.report(StepReport(
            model=self.model_name, engine=self.name, num_running=self.num_running,
            num_waiting=self.num_waiting, kv_usage=bm.usage, num_scheduled=num_scheduled,
            iteration_tokens=iteration_tokens, prompt_tokens=prompt, generation_tokens=generated,
            prefix_queries=q, prefix_hits=h, preemptions=p, inter_token_s=self._itl,
            finished=self._finished,
        ))
        self._itl, self._finished = [], []

    # ---- views ------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._board.publish(self.snapshot())

    def snapshot(self) -> EngineSnapshot:
        bm, st = self.block_manager, self.stats
        return EngineSnapshot(
            name=self.name, state=self.state, failure=self.failure, kernels=self.worker.kernels,
            num_requests=len(self._requests), num_requests_running=self.num_running,
            num_requests_waiting=self.num_waiting, waiting_prompt_tokens=self.waiting_prompt_tokens,
            inbox_depth=self._send.statistics().current_buffer_used,
            kv_cache_usage=bm.usage, num_kv_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            prefix_cache_evictions=bm.evictions, num_preemptions=self.scheduler.num_preemptions,
            context_restarts=st.context_restarts, request_failures=st.request_failures, steps=st.steps,
            multi_seq_steps=st.multi_seq_steps, prompt_tokens=st.prompt_tokens,
            generation_tokens=st.generation_tokens, forward_s=st.forward_s, step_s=st.step_s,
            forward_share=st.forward_s / st.step_s if st.step_s else math.nan,
            worker=self.worker.snapshot(),
        )


def _prompt_rows(seq: Sequence, start: int, n: int) -> PromptRows | None:
    """The rows of positions [start, start + n) that score a prompt token still missing its
    logprob entry: row p scores token p + 1, so the chunk's last row scores the next chunk's
    first token, and the prompt's last row (it predicts the first generated token) none."""
    nxt = seq.prompt_logprobs_next
    if nxt is None:
        return None
    assert start <= nxt - 1, "prompt-logprob rows were skipped"  # the scheduler limits cache hits
    first, end = max(start, nxt - 1), min(start + n, seq.num_prompt_tokens - 1)
    if end <= first:
        return None
    k = seq.params.prompt_logprobs or 0
    return PromptRows(first - start, seq.token_ids[first + 1 : end + 1], k)


def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprobs] | None:
    """The prompt's entries, once: with the first delta after the prompt was computed."""
    if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
        return None
    assert seq.prompt_logprobs_next is None, "the prompt ended with prompt-logprob entries missing"
    seq.prompt_logprobs_sent = True
    return seq.prompt_logprobs


def _metrics(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(seq.arrival, seq.first_scheduled, seq.first_token, time.monotonic(),
                          seq.num_output_tokens)


__all__ = ["EngineCore", "EngineHandle", "EngineSnapshot", "EngineStats", "SeqStatus"]
