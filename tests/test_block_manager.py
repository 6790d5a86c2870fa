"""BlockManager: allocation, reference counts, the prefix cache and LRU eviction (no model needed)."""

from __future__ import annotations

import random

import pytest

from atomr_trio.engine.block_manager import BlockManager
from atomr_trio.engine.sequence import Sequence
from atomr_trio.sampling_params import SamplingParams

BS = 4  # block size used throughout


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, 0, list(tokens), len(tokens), SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does on admission: look up the prefix cache, allocate the whole prompt."""
    hits = bm.lookup(seq)
    assert bm.can_allocate(seq, seq.num_tokens, hits)
    bm.allocate(seq, seq.num_tokens, hits)
    bm.record_admission(seq, len(hits))
    return hits


def compute(bm: BlockManager, seq: Sequence) -> None:
    """What one engine step does once the K/V of every token of seq are written."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed(seq)


def referenced(bm: BlockManager, seqs: list[Sequence]) -> int:
    return len({b for s in seqs for b in s.block_table})


def test_rejects_empty_cache() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BS)


def test_allocation_covers_tokens_and_free_returns_every_block() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(10)))
    admit(bm, seq)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(seq)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert seq.block_table == [] and seq.num_computed_tokens == 0


def test_growing_a_sequence_adds_blocks_only_at_block_boundaries() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq([1, 2, 3, 4])
    admit(bm, seq)
    assert len(seq.block_table) == 1
    first = list(seq.block_table)
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and seq.block_table[:1] == first
    bm.allocate(seq, 8)
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 6


def test_can_allocate_is_false_when_blocks_run_out() -> None:
    bm = BlockManager(2, BS)
    assert not bm.can_allocate(make_seq(list(range(9))), 9)
    assert bm.can_allocate(make_seq(list(range(8))), 8)


def test_no_block_leaks_with_shared_prefixes() -> None:
    bm = BlockManager(32, BS)
    rng = random.Random(0)
    prefix = list(range(100, 108))  # two full blocks shared by everyone
    seqs = []
    for i in range(6):
        seq = make_seq(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 7))], f"r{i}")
        admit(bm, seq)
        compute(bm, seq)
        seqs.append(seq)
        assert bm.num_free_blocks + referenced(bm, seqs) == bm.num_blocks
    # The shared prefix occupies two blocks once, not once per sequence.
    assert referenced(bm, seqs) < sum(len(s.block_table) for s in seqs)
    rng.shuffle(seqs)
    for i, seq in enumerate(seqs):
        bm.free(seq)
        assert bm.num_free_blocks + referenced(bm, seqs[i + 1 :]) == bm.num_blocks
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_for_shared_two_block_prefix() -> None:
    bm = BlockManager(16, BS)
    prefix = [7, 7, 8, 8, 9, 9, 10, 10]
    a = make_seq(prefix + [1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    free_before = bm.num_free_blocks

    b = make_seq(prefix + [4, 5], "b")
    hits = admit(bm, b)
    assert hits == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8  # only the suffix is left to compute
    assert b.num_cached_tokens == 8
    assert bm.num_free_blocks == free_before - 1  # only the tail block is new
    assert bm.prefix_hits == 8
    assert bm.prefix_queries == 11 + 10


def test_prefix_hash_chains_the_whole_prefix() -> None:
    bm = BlockManager(16, BS)
    a = make_seq([1, 1, 1, 1, 2, 2, 2, 2, 3])
    admit(bm, a)
    compute(bm, a)
    # Same second block, different first block: the second block must not be reused.
    b = make_seq([9, 9, 9, 9, 2, 2, 2, 2, 3])
    assert bm.lookup(b) == []
    # Same first block, different second block: only the first is reused.
    c = make_seq([1, 1, 1, 1, 2, 2, 2, 5, 3])
    assert bm.lookup(c) == a.block_table[:1]


def test_a_cached_block_is_found_only_behind_the_same_whole_prefix() -> None:
    # The case above stops at its first block's miss, so it cannot tell a chained hash from a
    # per-block one; here the first block hits, and the second block's tokens are cached, but
    # behind another prefix.
    bm = BlockManager(16, BS)
    a = make_seq([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0])
    admit(bm, a)
    compute(bm, a)
    d = make_seq([9, 9, 9, 9, 0], "d")
    admit(bm, d)
    compute(bm, d)
    # Second block equal to a's second block, first block equal to d's: only the first hits.
    b = make_seq([9, 9, 9, 9, 2, 2, 2, 2, 0], "b")
    assert bm.lookup(b) == d.block_table[:1]
    # a's first block, then a's third block at position two: only the first hits.
    c = make_seq([1, 1, 1, 1, 3, 3, 3, 3, 0], "c")
    assert bm.lookup(c) == a.block_table[:1]
    # and admission computes everything after the hit
    admit(bm, b)
    assert b.num_computed_tokens == BS and b.block_table[1] not in a.block_table


def test_lookup_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    tokens = list(range(8))
    a = make_seq(tokens + [99])
    admit(bm, a)
    compute(bm, a)

    exact = make_seq(tokens)  # the whole prompt is cached, yet its last token must be computed
    hits = admit(bm, exact)
    assert len(hits) == 1
    assert exact.num_computed_tokens == 4 < exact.num_tokens

    longer = make_seq(tokens + [5])
    assert bm.lookup(longer) == a.block_table[:2]


def test_only_computed_full_blocks_are_cached() -> None:
    bm = BlockManager(16, BS)
    tokens = list(range(11))
    a = make_seq(tokens)
    admit(bm, a)
    a.num_computed_tokens = 6  # a chunked prefill has written 1.5 blocks so far
    bm.cache_computed(a)
    assert bm.lookup(make_seq(tokens)) == a.block_table[:1]
    compute(bm, a)  # 11 tokens: two full blocks, the third is partial
    assert bm.lookup(make_seq(tokens + [0, 0])) == a.block_table[:2]


def test_generated_tokens_are_cached_too() -> None:
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6])
    admit(bm, a)
    compute(bm, a)
    for tok in (7, 8):  # two decode steps
        a.token_ids.append(tok)
        bm.allocate(a, a.num_tokens)
        compute(bm, a)
    follow_up = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # e.g. the next chat turn
    assert bm.lookup(follow_up) == a.block_table[:2]


def test_freed_blocks_stay_cached_until_reallocated() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(12))
    a = make_seq(tokens)
    admit(bm, a)
    compute(bm, a)
    cached = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8

    b = make_seq(tokens + [50])
    hits = admit(bm, b)
    assert hits == cached  # found although a's blocks were free
    assert bm.evictions == 0
    assert bm.num_free_blocks == 8 - 4  # three reclaimed from the free queue + one new
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_eviction_takes_unhashed_blocks_first_then_the_tail_of_a_prefix() -> None:
    bm = BlockManager(4, BS)
    tokens = list(range(12))
    a = make_seq(tokens)
    admit(bm, a)
    compute(bm, a)  # three hashed blocks; the fourth block was never used
    bm.free(a)

    x = make_seq([90, 91, 92, 93, 94])  # needs two blocks
    admit(bm, x)
    assert bm.evictions == 1  # the never-used block first, then one hashed block
    assert bm.num_free_blocks == 2
    # The evicted block is the last one of a's prefix, so its first two blocks still hit.
    assert len(bm.lookup(make_seq(tokens + [0]))) == 2


def test_unhashed_freed_blocks_are_reused_before_hashed_ones() -> None:
    bm = BlockManager(3, BS)
    a = make_seq(list(range(8)))
    admit(bm, a)
    compute(bm, a)  # two hashed blocks
    scratch = make_seq([40, 41, 42])
    admit(bm, scratch)
    compute(bm, scratch)  # a partial block: never hashed
    bm.free(a)
    bm.free(scratch)  # freed last, yet it must be handed out first

    x = make_seq([60, 61, 62, 63])
    admit(bm, x)
    assert bm.evictions == 0
    assert len(bm.lookup(make_seq(list(range(8)) + [0]))) == 2


def test_least_recently_freed_hashed_block_is_evicted_first() -> None:
    bm = BlockManager(2, BS)
    old = make_seq([1, 1, 1, 1])
    admit(bm, old)
    old.num_computed_tokens = 4
    bm.cache_computed(old)
    bm.free(old)
    new = make_seq([2, 2, 2, 2])
    admit(bm, new)
    new.num_computed_tokens = 4
    bm.cache_computed(new)
    bm.free(new)
    assert bm.evictions == 0  # new took the second, never-used block

    admit(bm, make_seq([3, 3, 3]))
    assert bm.evictions == 1
    assert bm.lookup(make_seq([1, 1, 1, 1, 0])) == []
    assert len(bm.lookup(make_seq([2, 2, 2, 2, 0]))) == 1


def test_can_allocate_does_not_count_reclaimed_hits_as_free() -> None:
    bm = BlockManager(3, BS)
    prefix = list(range(8))
    a = make_seq(prefix)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)  # 3 free blocks, two of them hold a's prefix

    fits = make_seq(prefix + [1, 2, 3, 4])  # 2 hits + 1 new block
    hits = bm.lookup(fits)
    assert len(hits) == 2
    assert bm.can_allocate(fits, fits.num_tokens, hits)

    too_big = make_seq(prefix + list(range(8)))  # 2 hits + 2 new blocks, only 1 other block
    hits = bm.lookup(too_big)
    assert len(hits) == 2
    assert not bm.can_allocate(too_big, too_big.num_tokens, hits)


def test_prefix_counters_count_a_request_once() -> None:
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))
    admit(bm, a)
    compute(bm, a)
    b = make_seq(list(range(9)))
    admit(bm, b)
    assert (bm.prefix_queries, bm.prefix_hits) == (18, 8)
    # Re-admission after a preemption must not count the prompt again.
    bm.free(b)
    admit(bm, b)
    assert (bm.prefix_queries, bm.prefix_hits) == (18, 8)
    assert b.num_cached_tokens == 8


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    b = make_seq(list(range(9)))
    assert admit(bm, b) == []
    assert b.num_computed_tokens == 0
    assert (bm.prefix_queries, bm.prefix_hits, bm.evictions) == (0, 0, 0)


def test_window_releases_blocks_no_query_can_see() -> None:
    """With every layer windowed (W = 6), blocks wholly below num_computed - W + 1 go back to the
    free queue as the sequence advances; the table stays positional (RELEASED entries)."""
    from atomr_trio.engine.block_manager import RELEASED

    bm = BlockManager(8, BS, window=6)
    seq = make_seq(list(range(10)))  # 3 blocks
    admit(bm, seq)
    compute(bm, seq)
    # the next query (position 10) sees 5..10: block 0 (0..3) is out, block 1 (4..7) is not
    assert bm.release_outside_window(seq) == 1
    assert seq.block_table[0] == RELEASED and RELEASED not in seq.block_table[1:]
    assert bm.num_free_blocks == 8 - 2
    assert bm.release_outside_window(seq) == 0  # nothing more until it advances
    seq.token_ids += [10, 11, 12, 13, 14]
    bm.allocate(seq, 15)
    compute(bm, seq)  # next query 15 sees 10..15: blocks 0 and 1 out
    assert bm.release_outside_window(seq) == 1
    assert seq.block_table[:2] == [RELEASED, RELEASED] and bm.num_free_blocks == 8 - 2
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.num_released_blocks == 0


def test_released_blocks_stay_findable_in_the_prefix_cache() -> None:
    bm = BlockManager(8, BS, window=4)
    a = make_seq(list(range(12)), "a")
    admit(bm, a)
    compute(bm, a)
    bm.release_outside_window(a)  # next query 12 sees 9..12: blocks 0 and 1 released
    b = make_seq(list(range(12)) + [99], "b")
    assert len(bm.lookup(b)) == 3  # the released blocks' K/V are intact until reused


def test_no_window_releases_nothing() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(12)))
    admit(bm, seq)
    compute(bm, seq)
    assert bm.release_outside_window(seq) == 0 and bm.num_free_blocks == 5
