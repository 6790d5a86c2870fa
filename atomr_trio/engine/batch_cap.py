"""BatchCap: how large a batch the scheduler may build after a step ran out of device memory.

Policy:
- Without an OOM there is no cap: the configured `max_num_seqs` and `max_num_batched_tokens`
  hold.
- A step of S sequences and T tokens runs out of memory: the cap becomes max(1, S // 2)
  sequences and max(1, T // 2) tokens (never above the cap already in force), so the engine
  does not rebuild the batch that just failed; the running sequences past the new sequence cap
  are preempted (recomputed later, engine/recovery.py).
- Every RAISE_AFTER successful steps in a row, each capped limit grows by half (at least 1);
  once it reaches its configured value the cap is lifted. Another OOM lowers it again from the
  failed step's size, so the engine settles on what the device can hold.

Invariant: both limits are always >= 1, so a capped scheduler can still run a step.
"""

from __future__ import annotations

from dataclasses import dataclass

RAISE_AFTER = 4  # successful steps in a row before a capped limit grows


@dataclass
class BatchCap:
    max_seqs: int  # the configured limits
    max_tokens: int
    seqs: int | None = None  # the caps in force (None: the configured limit)
    tokens: int | None = None
    _ok_steps: int = 0

    @property
    def num_seqs(self) -> int:
        return self.max_seqs if self.seqs is None else min(self.seqs, self.max_seqs)

    @property
    def num_tokens(self) -> int:
        return self.max_tokens if self.tokens is None else min(self.tokens, self.max_tokens)

    @property
    def capped(self) -> bool:
        return self.seqs is not None or self.tokens is not None

    def lower(self, failed_seqs: int, failed_tokens: int) -> None:
        """A step of this many sequences and tokens ran out of memory."""
        self.seqs = max(1, min(failed_seqs // 2, self.num_seqs))
        self.tokens = max(1, min(failed_tokens // 2, self.num_tokens))
        self._ok_steps = 0

    def succeeded(self) -> None:
        """A step ran; every RAISE_AFTER of them in a row, the caps grow."""
        if not self.capped:
            return
        self._ok_steps += 1
        if self._ok_steps < RAISE_AFTER:
            return
        self._ok_steps = 0
        self.seqs = _grow(self.seqs, self.max_seqs)
        self.tokens = _grow(self.tokens, self.max_tokens)


def _grow(cap: int | None, limit: int) -> int | None:
    if cap is None:
        return None
    cap += max(1, cap // 2)
    return None if cap >= limit else cap
