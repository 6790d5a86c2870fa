"""BlockManager: owns the KV cache's blocks — allocation, reference counts and the prefix cache.

Invariants:
- A block is either referenced by sequences (ref_count > 0) or in the free queue, never both;
  `num_free_blocks + referenced blocks == num_blocks` at all times.
- Only full blocks whose K/V have been computed carry a content hash. The hash of block i chains
  the hash of block i-1 with block i's token ids, so equal hashes mean equal whole prefixes.
- Freed blocks keep their hash and stay findable until the free queue hands them out again (LRU
  eviction); blocks without a hash are handed out first.
- With a `window` (a model whose every layer attends to its last `window` positions only), a
  sequence's leading blocks that no later query can see — every position below
  p - window + 1, p the next position to query (the engine passes the tokens its applied steps
  computed) — are released as it advances: their block-table entries
  become RELEASED (the table stays positional) and the blocks go back as freed ones do. A
  released entry is never read unmasked (the runner points it at block 0, outside every window).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from .sequence import Sequence

RELEASED = -1  # a block-table entry whose block was released (outside every window)


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window  # every layer's sliding window, when all layers have one
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix-cache counters, in tokens (queries/hits) and blocks (evictions).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Content hashes of seq's first num_blocks full blocks (memoized on the sequence)."""
        hs, bs = seq.block_hashes, self.block_size
        while len(hs) < num_blocks:
            i = len(hs)
            hs.append(block_hash(hs[-1] if hs else b"", seq.token_ids[i * bs : (i + 1) * bs]))
        return hs[:num_blocks]

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's longest cached prefix, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            b = self._by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, hits: Seq[int] = ()) -> bool:
        """Whether seq's block table can grow to cover num_tokens (taking `hits` first)."""
        have = len(seq.block_table) or len(hits)
        reclaimed = sum(1 for b in hits if self._ref[b] == 0)
        return self.blocks_for(num_tokens) - have <= len(self._free) - reclaimed

    def allocate(self, seq: Sequence, num_tokens: int, hits: Seq[int] = ()) -> None:
        """Grow seq's block table to cover num_tokens; `hits` (from lookup) only on admission."""
        if hits:
            assert not seq.block_table
            for b in hits:
                if self._ref[b] == 0:
                    del self._free[b]
                self._ref[b] += 1
            seq.block_table = list(hits)
            seq.num_computed_tokens = seq.num_applied_tokens = len(hits) * self.block_size
            seq.num_hashed_blocks = len(hits)
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                self._hash[b] = None
                if self._by_hash.get(h) == b:
                    del self._by_hash[h]
                self.evictions += 1
            self._ref[b] = 1
            seq.block_table.append(b)

    def record_admission(self, seq: Sequence, num_hit_blocks: int) -> None:
        hit_tokens = num_hit_blocks * self.block_size
        if seq.num_cached_tokens < 0:  # count each request's prompt once
            seq.num_cached_tokens = hit_tokens
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_prompt_tokens
                self.prefix_hits += hit_tokens

    def cache_computed(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Give a hash to every full block of seq whose K/V are now computed: among its first
        `num_tokens` (default: num_computed_tokens; the engine passes what applied steps computed)."""
        if not self.enable_prefix_caching:
            return
        computed = seq.num_computed_tokens if num_tokens is None else num_tokens
        full = min(computed // self.block_size, len(seq.block_table))
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            b, h = seq.block_table[i], hashes[i]
            if b != RELEASED and self._hash[b] is None and h not in self._by_hash:
                self._hash[b] = h
                self._by_hash[h] = b
        seq.num_hashed_blocks = full

    def forget_contents(self) -> None:
        """The KV tensors were lost (a rebuilt Context): no cached block may be found again."""
        assert len(self._free) == self.num_blocks, "free every sequence first"
        self._hash = [None] * self.num_blocks
        self._by_hash.clear()

    def release_outside_window(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Release seq's leading blocks that no query from position `num_tokens` (default:
        num_computed_tokens) on can see (all layers windowed only); how many were released now."""
        if self.window is None:
            return 0
        first_visible = (seq.num_computed_tokens if num_tokens is None else num_tokens) - self.window + 1
        end = min(max(0, first_visible) // self.block_size, len(seq.block_table))
        released = 0
        for i in range(seq.num_released_blocks, end):
            b = seq.block_table[i]
            seq.block_table[i] = RELEASED
            self._unref(b)
            released += 1
        seq.num_released_blocks = max(seq.num_released_blocks, end)
        return released

    def _unref(self, b: int) -> None:
        self._ref[b] -= 1
        assert self._ref[b] >= 0, "block freed twice"
        if self._ref[b] == 0:
            self._free[b] = None
            if self._hash[b] is None:
                self._free.move_to_end(b, last=False)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; tail blocks first so they are evicted before shared prefixes."""
        for b in reversed(seq.block_table):
            if b != RELEASED:
                self._unref(b)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_released_blocks = 0
        seq.num_computed_tokens = seq.num_applied_tokens = 0
