"""Sequence: the engine's state for one sample of one request.

Invariants:
- `token_ids` (prompt + generated) is the whole truth of a sequence. Its last `num_pending` entries
  are PLACEHOLDERs: tokens that steps in flight will sample (a step appends one when it is
  submitted, its result replaces it, a failed step takes it back), so a step can be scheduled
  before the one it follows has returned (engine_core.py, "async scheduling").
- The KV cache holds, or a step in flight is writing, the first `num_computed_tokens` of them;
  the first `num_applied_tokens` are computed by steps whose results were applied.
- Preemption only resets the counts and the block table, so a preempted sequence is recomputed
  from its tokens and loses nothing; the prompt logprobs computed so far stay too, so a
  recompute neither repeats nor loses an entry.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from ..executor.model_runner import PLACEHOLDER
from ..executor.sampler import TokenLogprobs
from ..grammar.matcher import Matcher
from ..sampling_params import SamplingParams

_seq_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_applied_tokens: int = 0
    num_pending: int = 0  # trailing PLACEHOLDERs in token_ids
    awaiting: bool = False  # its pending token must be known before it is scheduled again
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the leading full blocks
    num_hashed_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_released_blocks: int = 0  # leading entries of block_table released (BlockManager.RELEASED)
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    leader: Sequence | None = None  # for n > 1: sample 0, whose prompt blocks this one reuses
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    # Sample 0 of a request asking for prompt logprobs: the entries of prompt positions 1, 2, ...
    # computed so far (position 0 has none); shipped once, with the delta that ends the prompt.
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_sent: bool = False
    matcher: Matcher | None = None  # structured outputs: the grammar's state after output_token_ids

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = []
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed((self.params.seed + self.index) & ((1 << 63) - 1))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        """Generated tokens already known (placeholders of steps in flight left out)."""
        return self.num_output_tokens - self.num_pending

    def add_placeholder(self) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def resolve(self, position: int, token: int) -> None:
        """The token a step sampled at `position` replaces its placeholder."""
        assert self.token_ids[position] == PLACEHOLDER, "a sampled token was resolved twice"
        self.token_ids[position] = token
        self.num_pending -= 1
        self.awaiting = self.awaiting and self.num_pending > 0  # it awaits its last pending token

    def drop_placeholders(self) -> None:
        """Forget the tokens of steps in flight (the sequence ended, or those steps failed)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
        self.num_pending = 0
        self.awaiting = False

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_logprobs_next(self) -> int | None:
        """The first prompt position whose logprob entry is still missing (its logits are those
        of the row before it); None when nothing is pending."""
        if self.prompt_logprobs is None:
            return None
        nxt = 1 + len(self.prompt_logprobs)
        return nxt if nxt < self.num_prompt_tokens else None

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then arrival (FCFS)."""
        return (self.params.priority, self.arrival, self.seq_id)
