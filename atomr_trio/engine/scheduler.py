"""Scheduler: decides which tokens of which sequences one engine step computes.

Invariants (docs/architecture.md, "The engine step"):
- There is no prefill or decode phase: each step spends a token budget, first on running
  sequences (one token each for decodes, or the next prompt chunk), then on waiting sequences
  in priority/FCFS order (chunked prefill). Prompt chunks also spend a budget of their own
  (`max_prefill_tokens`, at most the step's): a decode — one token to compute, past the
  prompt — spends only the step's, so on a CPU, where the step's budget leaves room for every
  running sequence beside the prompt budget, decodes do not shrink the prompt chunks.
- A sequence with prompt-logprob entries still to compute takes no cached block past the row
  its next entry needs: cached blocks carry K/V, not logits.
- When blocks run out, the lowest-priority, most recently admitted running sequence is preempted:
  its blocks are freed and it goes back to the front of the waiting queue to be recomputed.
- After a step ran out of device memory, `cap` (batch_cap.py) limits the sequences running and
  the tokens of a step below the configured limits, until steps succeed again.
- A sequence is in exactly one of `waiting` or `running` until it finishes; a finished or
  aborted sequence holds no blocks.
- With a step in flight (async scheduling) its sequences count as computed and their sampled
  tokens as PLACEHOLDERs: a running sequence decodes its placeholder unless it is `awaiting`
  (its token must be known first: a grammar, or the token may end it). A waiting sequence never
  holds a placeholder when it is admitted: preemption admits nobody in the same step, and the
  step that was in flight when it was preempted is applied before any later step is scheduled.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from .batch_cap import BatchCap
from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence


@dataclass
class Scheduled:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int | None = None):
        self.bm = block_manager
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.cap = BatchCap(max_num_seqs, max_num_batched_tokens)  # the configured limits, and any OOM cap
        self.max_prefill_tokens = max_prefill_tokens or max_num_batched_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.cap.max_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.cap.max_tokens

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the queues for good and free its blocks (idempotent)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.drop_placeholders()  # the steps in flight for it are dropped when they return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cap.num_tokens  # every token of the step
        prefill = min(self.max_prefill_tokens, budget)  # ... of which prompt chunks
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            left = seq.num_tokens - seq.num_computed_tokens
            # a chunk (of its prompt, or of a preempted sequence's tokens), not a decode
            chunk = left > 1 or seq.num_computed_tokens < seq.num_prompt_tokens
            n = min(left, budget, prefill) if chunk else min(left, budget)
            if n == 0 or seq.awaiting:  # everything it has is in flight, or its next token must be known
                i += 1
                continue
            while not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self._pick_victim(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, seq.num_computed_tokens + n)
                out.scheduled.append(Scheduled(seq, n))
                budget -= n
                if chunk:
                    prefill -= n
                i += 1
        if out.preempted:
            return out  # memory is tight: admit nobody new this step
        while self.waiting and len(self.running) < self.cap.num_seqs and min(budget, prefill) > 0:
            seq = self.waiting[0]
            if not _leader_ready(seq):
                break
            hits = self.bm.lookup(seq)
            pending = seq.prompt_logprobs_next
            if pending is not None:
                # A cached block has no logits: compute every row from the one before the first
                # missing prompt-logprob entry (a fresh request takes no cached block at all).
                hits = hits[: (pending - 1) // self.bm.block_size]
            computed = len(hits) * self.bm.block_size
            most = min(budget, prefill)  # the longest chunk this step can take
            n = min(seq.num_tokens - computed, most)
            if hits and self.bm.window is not None and not self.bm.can_allocate(seq, computed + n, hits):
                # windowed: a long cached prefix may not fit, though the sequence alone always does
                hits, computed, n = [], 0, min(seq.num_tokens, most)
            if not self.bm.can_allocate(seq, computed + n, hits):
                break
            self.waiting.pop(0)
            self.bm.allocate(seq, computed + n, hits)
            self.bm.release_outside_window(seq)  # cached blocks its first query cannot see
            self.bm.record_admission(seq, len(hits))
            seq.status = SeqStatus.RUNNING
            seq.first_scheduled = seq.first_scheduled or time.monotonic()
            self.running.append(seq)
            out.scheduled.append(Scheduled(seq, n))
            budget -= n
            prefill -= n
        return out

    def _pick_victim(self, first: int) -> Sequence:
        """Among running[first:] (not yet scheduled this step): highest priority value, latest."""
        candidates = self.running[first:]
        worst = max(seq.params.priority for seq in candidates)
        return next(s for s in reversed(candidates) if s.params.priority == worst)

    def requeue_all(self) -> None:
        """Send every running sequence back to waiting (its KV is gone); tokens are kept."""
        for seq in list(self.running):
            self.running.remove(seq)
            self.bm.free(seq)
            self.add(seq)

    def shed(self, keep: int) -> list[Sequence]:
        """Preempt running sequences (lowest priority, most recently admitted first) until at
        most `keep` run; they are recomputed later. Returns the preempted ones."""
        shed = []
        while len(self.running) > keep:
            victim = self._pick_victim(0)
            self._preempt(victim)
            shed.append(victim)
        return shed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)


def _leader_ready(seq: Sequence) -> bool:
    """Samples 1..n-1 of a request wait until sample 0 has computed (and cached) the prompt."""
    lead = seq.leader
    return (
        lead is None
        or lead.status is SeqStatus.FINISHED
        or lead.num_applied_tokens >= lead.num_prompt_tokens
        or lead.num_generated > 0
    )
