"""Matcher: one sample's place in its grammar, and the batched mask that keeps its next token
inside it.

Invariants:
- A matcher has accepted exactly the sample's generated tokens: the engine advances it when a
  step's result is applied (never in the step), so a failed or retried step, a preemption and
  its recompute leave it where the sample's tokens are.
- During a step the sampler only reads it (`fill`), on the device thread; nothing advances it
  until the step's result comes back.
- One bitmask for the whole batch, filled row by row in xgrammar's native code and applied to
  the constrained rows' logits in one op; a batch without constrained rows builds none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar


class Matcher:
    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        import xgrammar

        self._m = xgrammar.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next into row `row` of `bitmask`."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False when the grammar does not allow it."""
        return bool(self._m.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._m.is_terminated())


def mask_logits(logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar forbids (rows without one untouched)."""
    import xgrammar

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        m = matchers[i]
        assert m is not None
        m.fill(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
