"""RequestTable: an engine's live requests — admitting them, and ending each of their samples.

Invariants:
- A request is in the table from its admitted AddRequest until its last sample finishes; an
  AddRequest that fails the checks is answered with an error delta per sample and never enters.
- Every sample ends in `_end_sample`, and only there: its final delta (with its metrics) goes to
  the request's outbox, the scheduler finishes it (its blocks are freed), its finish reason is
  counted, and once all samples of the request have ended the request leaves the table (with a
  FinishedRequest record, when records are wanted). Ending an ended sample does nothing, so
  aborts are idempotent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..executor.sampler import TokenLogprobs
from ..grammar.matcher import Matcher
from .block_manager import BlockManager
from .engine_config import EngineConfig
from .engine_stats import EngineStats
from .messages import AddRequest, RequestMetrics, SeqDelta
from .outbox import Outbox
from .reports import FinishedRequest
from .scheduler import Scheduler
from .sequence import Sequence
from .validation import check_request


@dataclass
class _Live:
    seqs: list[Sequence]
    outbox: Outbox[SeqDelta]


class RequestTable:
    def __init__(self, scheduler: Scheduler, block_manager: BlockManager, cfg: EngineConfig,
                 vocab_size: int, stats: EngineStats, keep_records: bool) -> None:
        assert cfg.max_model_len is not None and cfg.num_kv_blocks is not None, "resolve cfg first"
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.stats = stats
        self.keep_records = keep_records
        self._live: dict[str, _Live] = {}
        self._records: list[FinishedRequest] = []  # since the last take_records()

    def __len__(self) -> int:
        return len(self._live)

    # ---- admission ----------------------------------------------------------------------------
    def add(self, msg: AddRequest) -> None:
        """Admit a request (its samples join the scheduler's queue), or answer it with an error."""
        try:
            self._check(msg)
        except ValueError as e:
            for i in range(msg.params.n):
                msg.outbox.push(SeqDelta(i, [], None, "error", error=str(e)))
            return
        seqs: list[Sequence] = []
        for i in range(msg.params.n):
            seq = Sequence(msg.request_id, i, list(msg.prompt_token_ids), len(msg.prompt_token_ids),
                           msg.params, leader=seqs[0] if seqs else None,
                           matcher=Matcher(msg.grammar) if msg.grammar is not None else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self._live[msg.request_id] = _Live(seqs, msg.outbox)

    def _check(self, msg: AddRequest) -> None:
        """Raise ValueError for a request this engine cannot serve (`validation.check_request`,
        the check every face ran before sending it; the engine runs it again because anyone
        holding its handle may send). Every admitted request fits the KV cache on its own,
        which is what lets the scheduler always make progress."""
        if msg.request_id in self._live:
            raise ValueError(f"request id {msg.request_id!r} is already in use")
        check_request(msg.prompt_token_ids, msg.params, self.cfg, self.vocab_size, kv_window=self.block_manager.window)
        if msg.params.structured_outputs is not None and msg.grammar is None:
            raise ValueError("structured_outputs: the request's grammar was not compiled (Request.prepare)")

    # ---- results and endings ------------------------------------------------------------------
    def emit(self, seq: Sequence, token: int | None, logprobs: TokenLogprobs | None, reason: str | None) -> None:
        """A step's result for a sample: its new token (None: a scored prompt, no token), which
        ends the sample when `reason` is set. The prompt's logprobs ride on the first delta
        after the prompt was computed."""
        live = self._live[seq.request_id]
        delta = SeqDelta(seq.index, [] if token is None else [token], [logprobs] if logprobs else None, reason,
                         max(seq.num_cached_tokens, 0), metrics=_metrics(seq) if reason is not None else None,
                         prompt_logprobs=_take_prompt_logprobs(seq))
        if reason is None:
            live.outbox.push(delta)
        else:
            self._end_sample(seq, live, delta)

    def abort(self, request_id: str, index: int | None = None, outbox: Outbox[SeqDelta] | None = None) -> None:
        """End the request's samples (only sample `index`, if given) with "abort". With `outbox`,
        only if the request reports to it (an owner whose AddRequest was refused because its id
        was in use cannot abort the request holding that id)."""
        live = self._live.get(request_id)
        if live is None or (outbox is not None and live.outbox is not outbox):
            return  # finished already, never known, or another owner's: aborts are idempotent
        for seq in live.seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self._end_sample(seq, live, SeqDelta(seq.index, [], None, "abort", metrics=_metrics(seq)))

    def abort_all(self) -> None:
        for request_id in list(self._live):
            self.abort(request_id)

    def fail(self, request_id: str, error: str) -> None:
        """End every sample of the request with finish reason "error" and this message."""
        live = self._live.get(request_id)
        if live is None:
            return
        for seq in live.seqs:
            if not seq.is_finished:
                self._end_sample(seq, live, SeqDelta(seq.index, [], None, "error", error=error,
                                                     metrics=_metrics(seq)))

    def end_all(self, failure: str | None) -> None:
        """The engine stops: every live request ends, with an error if the engine failed."""
        for request_id in list(self._live):
            if failure:
                self.fail(request_id, failure)
            else:
                self.abort(request_id)

    def _end_sample(self, seq: Sequence, live: _Live, final: SeqDelta) -> None:
        if seq.is_finished:
            return
        assert final.finish_reason is not None
        live.outbox.push(final)
        self.scheduler.finish(seq, final.finish_reason)
        self.stats.finished[final.finish_reason] = self.stats.finished.get(final.finish_reason, 0) + 1
        if all(s.is_finished for s in live.seqs):
            del self._live[seq.request_id]
            if self.keep_records:
                self._records.append(_record(live.seqs, time.monotonic()))

    def take_records(self) -> list[FinishedRequest]:
        """The requests finished since the last call (none unless `keep_records`)."""
        records, self._records = self._records, []
        return records


def _record(seqs: list[Sequence], now: float) -> FinishedRequest:
    """A finished request's timings (monotonic, taken when its last sample ended)."""
    lead = seqs[0]
    return FinishedRequest(
        reason=lead.finish_reason or "abort",
        prompt_tokens=lead.num_prompt_tokens,
        generation_tokens=sum(s.num_generated for s in seqs),
        e2e_s=now - lead.arrival,
        queue_s=lead.first_scheduled - lead.arrival if lead.first_scheduled else None,
        ttft_s=lead.first_token - lead.arrival if lead.first_token else None,
        prefill_s=(lead.first_token - lead.first_scheduled
                   if lead.first_token and lead.first_scheduled else None),
        decode_s=now - lead.first_token if lead.first_token else None,
        n=len(seqs),
        max_tokens=lead.params.max_tokens,
        max_generation_tokens=max(s.num_generated for s in seqs),
    )


def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprobs] | None:
    """The prompt's entries, once: with the first delta after the prompt was computed."""
    if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
        return None
    assert seq.prompt_logprobs_next is None, "the prompt ended with prompt-logprob entries missing"
    seq.prompt_logprobs_sent = True
    return seq.prompt_logprobs


def _metrics(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(seq.arrival, seq.first_scheduled, seq.first_token, time.monotonic(),
                          seq.num_generated)
