"""What crosses the wall between the engine and its Worker in one step: the StepBatch built from
the scheduler's output, and the StepResult applied back to the sequences.

Invariants:
- A StepBatch is a snapshot: it copies every list it takes from a Sequence, so the engine may
  change sequences (abort them) while the step runs on the device thread. The live objects it
  holds — a sample's grammar matcher, only read in the step and advanced here when the sampled
  token is applied, and a seeded sample's generator — are used by one step at a time.
- Submitting a step (`launch`) counts its tokens as computed and appends a PLACEHOLDER for each
  token it samples; applying its result replaces the placeholders and is where a running
  sequence gains applied (cached, windowed) or generated tokens (admission with prefix-cache
  hits starts it with those applied); a failed step is taken back
  (`take_back`) before anything else is done about it. A result is applied only to sequences
  that are still live: one aborted during the step keeps nothing of it.
- Prompt-logprob rows are asked for exactly once per prompt position (`prompt_rows`), so a
  chunked or recomputed prompt neither repeats nor loses an entry.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from ..executor.model_runner import PLACEHOLDER, BatchItem, PromptRows, StepBatch, StepResult, fill_placeholders
from ..executor.sampler import SampleRow
from .block_manager import BlockManager
from .engine_stats import EngineStats, StepReporter
from .request_table import RequestTable
from .scheduler import Scheduled, SchedulerOutput
from .sequence import SeqStatus, Sequence


def build_batch(sched: SchedulerOutput, follows: bool = False) -> StepBatch:
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
                matcher=seq.matcher,
            )
        items.append(BatchItem(seq.seq_id, seq.token_ids[c : c + n], c, list(seq.block_table), row,
                               prompt_rows(seq, c, n)))
    return StepBatch(items, follows)


def can_follow(scheduled: list[Scheduled]) -> bool:
    """Whether a step can be scheduled before this one returns: not while one of its sequences
    has a grammar (its next mask needs the token) or prompt-logprob entries to come (the next
    chunk's rows depend on them)."""
    return all(s.seq.matcher is None and s.seq.prompt_logprobs_next is None for s in scheduled)


def launch(scheduled: list[Scheduled], items: list[BatchItem], max_model_len: int) -> None:
    """The step is submitted: its tokens count as computed, and each token it samples is a
    PLACEHOLDER until its result is applied. A sequence whose next step needs that token
    first (a grammar, prompt logprobs, or the token may be its last) is `awaiting` meanwhile."""
    for s, item in zip(scheduled, items, strict=True):
        seq = s.seq
        assert seq.status is SeqStatus.RUNNING, "only a running sequence is stepped"
        seq.num_computed_tokens += s.num_new_tokens
        if item.sample is None:
            continue
        seq.add_placeholder()
        p = seq.params
        seq.awaiting = (not can_follow([s]) or seq.num_tokens >= max_model_len
                        or (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens))


def take_back(scheduled: list[Scheduled], items: list[BatchItem]) -> None:
    """Undo `launch` of a step that failed (taken back latest first when several were in flight):
    its tokens are not computed and its placeholders go. Blocks it allocated stay with their
    sequences; a sequence preempted or finished since keeps what that left it."""
    for s, item in zip(scheduled, items, strict=True):
        seq = s.seq
        if seq.is_finished:
            continue
        if item.sample is not None:
            seq.drop_placeholders()
        if seq.status is SeqStatus.RUNNING and seq.num_computed_tokens == item.start + s.num_new_tokens:
            seq.num_computed_tokens = item.start


def known_tokens(scheduled: list[Scheduled], items: list[BatchItem]) -> list[BatchItem]:
    """The items of a step whose predecessor has been applied, with its PLACEHOLDERs replaced by
    the tokens now known (to run them again, alone, after the step failed): a placeholder stands
    at its row's own position, which the predecessor's result has filled in on the sequence.
    Rows of finished sequences keep theirs (Recovery skips them)."""
    out = []
    for s, item in zip(scheduled, items, strict=True):
        if not s.seq.is_finished and PLACEHOLDER in item.token_ids:
            item = fill_placeholders(StepBatch([item]), {item.seq_id: s.seq.token_ids[item.start]}).items[0]
        out.append(item)
    return out


def prompt_rows(seq: Sequence, start: int, n: int) -> PromptRows | None:
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


class ResultApplier:
    """Applies StepResults: advances each sequence, caches its full blocks, appends the sampled
    token, counts tokens, and hands each sample's delta (and its end) to the RequestTable."""

    def __init__(self, table: RequestTable, block_manager: BlockManager, stats: EngineStats,
                 reporter: StepReporter, eos_token_ids: Collection[int], max_model_len: int) -> None:
        self.table = table
        self.block_manager = block_manager
        self.stats = stats
        self.reporter = reporter
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def apply(self, scheduled: list[Scheduled], items: list[BatchItem], result: StepResult) -> None:
        self.stats.forward_s += result.forward_s
        row_of = {sid: j for j, sid in enumerate(result.seq_ids)}
        now = time.monotonic()
        for s, item in zip(scheduled, items, strict=True):
            seq = s.seq
            if seq.is_finished:
                continue  # aborted or ended while the step ran
            end = item.start + s.num_new_tokens  # the step computed positions start .. end - 1
            self._advance(seq, end, item.start, result)
            if item.sample is None:
                if seq.params.max_tokens == 0 and end == seq.num_tokens:
                    self.table.emit(seq, None, None, "length")  # the prompt is scored: done
                continue
            j = row_of[seq.seq_id]
            tok = result.sampled.token_ids[j]
            seq.resolve(end, tok)
            self._count(seq, now)
            if seq.matcher is not None and not seq.matcher.accept(tok):
                self.table.fail(seq.request_id, f"the sampled token {tok} is outside the request's grammar")
                continue
            self.table.emit(seq, tok, result.sampled.logprobs[j], self._finish_reason(seq, tok, end + 1))

    def _advance(self, seq: Sequence, end: int, start: int, result: StepResult) -> None:
        """The step computed seq's positions start .. end - 1."""
        if seq.status is SeqStatus.RUNNING:  # a preempted one is recomputed: nothing to cache
            seq.num_applied_tokens = end
            self.block_manager.cache_computed(seq, end)
            self.block_manager.release_outside_window(seq, end)
        prompt_end = min(end, seq.num_prompt_tokens)
        self.stats.prompt_tokens += max(0, prompt_end - start)
        if seq.prompt_logprobs is not None:
            seq.prompt_logprobs.extend(result.prompt_logprobs.get(seq.seq_id, ()))

    def _count(self, seq: Sequence, now: float) -> None:
        seq.first_token = seq.first_token or now
        if seq.last_token is not None and self.reporter.wants_details:
            self.reporter.inter_token(now - seq.last_token)
        seq.last_token = now
        self.stats.generation_tokens += 1

    def _finish_reason(self, seq: Sequence, tok: int, num_tokens: int) -> str | None:
        """Why the sample ends with `tok`, its `num_tokens`-th token (later ones may be in flight)."""
        p = seq.params  # the sampler forbids stop tokens before min_tokens
        if not p.ignore_eos and tok in self.eos_token_ids:
            return "stop"
        if p.stop_token_ids and tok in p.stop_token_ids:
            return "stop"
        if seq.matcher is not None and seq.matcher.is_terminated:
            return "stop"  # the grammar is complete
        if p.max_tokens is not None and num_tokens - seq.num_prompt_tokens >= p.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None
