"""Scheduler: token budget, chunked prefill, ordering, preemption by recompute (no model needed).

Each test drives the scheduler the way EngineCore does: schedule(), then for every scheduled
item mark its tokens computed, cache the full blocks and append a token when the step samples.
"""

from __future__ import annotations

import itertools
import random

import pytest

from atomr_trio.engine.block_manager import BlockManager
from atomr_trio.engine.scheduler import Scheduler, SchedulerOutput
from atomr_trio.engine.sequence import SeqStatus, Sequence
from atomr_trio.sampling_params import SamplingParams

BS = 4
_fresh_tokens = itertools.count(1000)  # prompts made of these never share a prefix


def make_scheduler(
    num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, prefix_caching: bool = True,
    prefill: int | None = None,
) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), max_num_seqs, budget, prefill)


def make_seq(
    tokens: list[int] | int,
    priority: int = 0,
    request_id: str = "r",
    index: int = 0,
    leader: Sequence | None = None,
) -> Sequence:
    if isinstance(tokens, int):  # a prompt of that many fresh tokens
        tokens = [next(_fresh_tokens) for _ in range(tokens)]
    params = SamplingParams(priority=priority)
    return Sequence(request_id, index, list(tokens), len(tokens), params, leader=leader)


def step(sched: Scheduler, token: int = 1) -> tuple[SchedulerOutput, list[tuple[Sequence, int, bool]]]:
    """One engine step: returns the scheduler output and (seq, num_new_tokens, sampled) per item."""
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    chunks = sum(s.num_new_tokens for s in out.scheduled
                 if s.num_new_tokens > 1 or s.seq.num_computed_tokens < s.seq.num_prompt_tokens)
    assert chunks <= sched.max_prefill_tokens
    assert len(sched.running) <= sched.max_num_seqs
    done = []
    for s in out.scheduled:
        samples = s.samples  # before mutating the sequence
        s.seq.num_computed_tokens += s.num_new_tokens
        sched.bm.cache_computed(s.seq)
        if samples:
            s.seq.token_ids.append(token)
        done.append((s.seq, s.num_new_tokens, samples))
    return out, done


def test_chunked_prefill_spends_the_budget_in_chunks() -> None:
    sched = make_scheduler(budget=16)
    seq = make_seq(40)
    sched.add(seq)
    steps = [step(sched)[1] for _ in range(4)]
    assert steps == [[(seq, 16, False)], [(seq, 16, False)], [(seq, 8, True)], [(seq, 1, True)]]
    assert seq.num_output_tokens == 2


def test_budget_is_split_across_prompts() -> None:
    sched = make_scheduler(budget=16)
    a, b = make_seq(10, request_id="a"), make_seq(10, request_id="b")
    sched.add(a)
    sched.add(b)
    _, first = step(sched)
    assert first == [(a, 10, True), (b, 6, False)]
    _, second = step(sched)
    assert second == [(a, 1, True), (b, 4, True)]


def test_running_decodes_come_before_new_prompt_chunks() -> None:
    sched = make_scheduler(budget=16)
    a, b = make_seq(5, request_id="a"), make_seq(5, request_id="b")
    sched.add(a)
    sched.add(b)
    step(sched)
    c = make_seq(30, request_id="c")
    sched.add(c)
    for expect_c, c_samples in ((14, False), (14, False), (2, True)):
        _, items = step(sched)
        assert items == [(a, 1, True), (b, 1, True), (c, expect_c, c_samples)]


def test_with_a_prefill_budget_decodes_do_not_shrink_the_prompt_chunks() -> None:
    sched = make_scheduler(budget=16 + 8, prefill=16)  # room for 8 decodes beside the prompt chunks
    a, b = make_seq(5, request_id="a"), make_seq(5, request_id="b")
    sched.add(a)
    sched.add(b)
    _, items = step(sched)
    assert items == [(a, 5, True), (b, 5, True)]
    c = make_seq(30, request_id="c")
    sched.add(c)
    for expect_c, c_samples in ((16, False), (14, True)):
        _, items = step(sched)
        assert items == [(a, 1, True), (b, 1, True), (c, expect_c, c_samples)]


def test_the_step_budget_still_caps_decodes_and_chunks_together() -> None:
    sched = make_scheduler(budget=16 + 1, prefill=16)  # room for one decode beside a full chunk
    a, b = make_seq(3, request_id="a"), make_seq(3, request_id="b")
    sched.add(a)
    sched.add(b)
    step(sched)
    c, d = make_seq(40, request_id="c"), make_seq(8, request_id="d")
    sched.add(c)
    sched.add(d)
    _, items = step(sched)
    assert items == [(a, 1, True), (b, 1, True), (c, 15, False)]  # 17 in all
    _, items = step(sched)  # c's next chunk takes what the step leaves; d waits
    assert items == [(a, 1, True), (b, 1, True), (c, 15, False)]
    _, items = step(sched)
    assert items == [(a, 1, True), (b, 1, True), (c, 10, True), (d, 5, False)]


def test_running_and_waiting_prompts_share_the_prefill_budget() -> None:
    sched = make_scheduler(budget=24, prefill=16)
    c, d = make_seq(40, request_id="c"), make_seq(40, request_id="d")
    sched.add(c)
    sched.add(d)
    _, items = step(sched)
    assert items == [(c, 16, False)]  # 8 of the step's tokens are left, none of the prompts'
    assert sched.waiting == [d]
    _, items = step(sched)
    assert items == [(c, 16, False)]
    _, items = step(sched)
    assert items == [(c, 8, True), (d, 8, False)]
    _, items = step(sched)  # c decodes beside d's full chunk
    assert items == [(c, 1, True), (d, 16, False)]


def test_a_prompts_last_token_is_a_prompt_token() -> None:
    sched = make_scheduler(budget=24, prefill=16)
    c, d = make_seq(17, request_id="c"), make_seq(40, request_id="d")
    sched.add(c)
    sched.add(d)
    assert step(sched)[1] == [(c, 16, False)]
    assert step(sched)[1] == [(c, 1, True), (d, 15, False)]  # not 16: c's last prompt token counts


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=64)
    a, b, c = (make_seq(3, request_id=r) for r in "abc")
    for s in (a, b, c):
        sched.add(s)
    _, items = step(sched)
    assert [s for s, _, _ in items] == [a, b]  # budget is left, but c must wait
    assert sched.waiting == [c] and c.block_table == []
    sched.finish(a, "stop")
    _, items = step(sched)
    assert [(s, n) for s, n, _ in items] == [(b, 1), (c, 3)]


def test_waiting_queue_is_ordered_by_priority_then_arrival() -> None:
    sched = make_scheduler(max_num_seqs=1)
    seqs = {name: make_seq(3, priority=p, request_id=name)
            for name, p in (("p5", 5), ("p0", 0), ("p3", 3), ("p0-later", 0), ("neg", -1))}
    for s in seqs.values():
        sched.add(s)
    admitted = []
    while sched.has_work():
        _, items = step(sched)
        assert len(items) == 1
        admitted.append(items[0][0].request_id)
        sched.finish(items[0][0], "stop")
    assert admitted == ["neg", "p0", "p0-later", "p3", "p5"]


def test_preemption_frees_blocks_and_requeues_ahead_of_later_arrivals() -> None:
    sched = make_scheduler(num_blocks=4, max_num_seqs=2)
    bm = sched.bm
    a, b = make_seq(7, request_id="a"), make_seq(7, request_id="b")
    c = make_seq(3, request_id="c")
    for s in (a, b, c):
        sched.add(s)
    step(sched, token=11)  # a and b: 7-token prompts, 2 blocks each; the cache is now full
    step(sched, token=12)  # both decode into their second block
    assert bm.num_free_blocks == 0 and a.num_tokens == b.num_tokens == 9
    b_tokens = list(b.token_ids)

    out, items = step(sched, token=13)  # a needs a third block: b (same priority, later) yields
    assert out.preempted == [b]
    assert items == [(a, 1, True)]
    assert b.status is SeqStatus.WAITING and b not in sched.running
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting == [b, c]  # b arrived before c, so it is recomputed first
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.token_ids == b_tokens  # nothing generated is lost
    assert bm.num_free_blocks + len(a.block_table) == bm.num_blocks

    sched.finish(a, "stop")
    _, items = step(sched, token=14)
    (seq, n, samples), *rest = items
    assert seq is b and samples
    assert b.num_computed_tokens == 9  # the whole sequence was recomputed (some may be cache hits)
    assert b.token_ids == b_tokens + [14]
    assert [s for s, _, _ in rest] == [c]
    for s in (b, c):
        sched.finish(s, "stop")
    assert bm.num_free_blocks == bm.num_blocks
    assert not sched.has_work()


def test_preemption_picks_the_lowest_priority_before_the_latest() -> None:
    sched = make_scheduler(num_blocks=4, max_num_seqs=2)
    low = make_seq(7, priority=2, request_id="low")
    sched.add(low)
    step(sched)  # low is admitted first (alone)
    high = make_seq(7, priority=0, request_id="high")
    sched.add(high)
    step(sched)  # low decodes, high is admitted: all four blocks are in use
    assert sched.bm.num_free_blocks == 0

    out, items = step(sched)  # low needs a third block
    assert out.preempted == [low]
    assert items == [(high, 1, True)]
    assert sched.running == [high] and sched.waiting == [low]
    assert low.block_table == [] and low.num_computed_tokens == 0


def test_preemption_order_with_priorities_mixed_into_admission_order() -> None:
    """Victims come from the sequences not yet scheduled this step, highest priority value
    first, the latest admitted among equals; they wait again in (priority, arrival) order."""
    sched = make_scheduler(num_blocks=6, max_num_seqs=8)
    bm = sched.bm
    seqs = {}
    for name, length, priority in (("A", 4, 0), ("B", 2, 1), ("C", 2, 1), ("D", 3, 0)):
        seqs[name] = make_seq(length, priority=priority, request_id=name)
        sched.add(seqs[name])
        step(sched)  # admitted one per step: running is A, B, C, D with priorities 0, 1, 1, 0
    a, b, c, d = (seqs[k] for k in "ABCD")
    step(sched)
    assert sched.running == [a, b, c, d] and bm.num_free_blocks == 0
    assert [len(s.block_table) for s in (a, b, c, d)] == [2, 2, 1, 1]
    tokens_before = {k: list(s.token_ids) for k, s in seqs.items()}

    # A needs a third block: the victim is C (priority 1, admitted after B), not D (latest) nor
    # B (earlier among the priority-1 ones). B fits; D then needs a block, and only D itself is
    # left unscheduled, so D yields, never A or B, which this step already computes.
    out, items = step(sched)
    assert out.preempted == [c, d]
    assert [s for s, _, _ in items] == [a, b]
    assert sched.running == [a, b]
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in (c, d))
    e = make_seq(2, priority=0, request_id="E")
    sched.add(e)
    assert sched.waiting == [d, e, c]  # D keeps its arrival: ahead of the later E; C is priority 1

    for s in (a, b):
        sched.finish(s, "stop")
    _, items = step(sched)
    assert [(s, samples) for s, _, samples in items] == [(d, True), (e, True), (c, True)]
    for k, s in (("C", c), ("D", d)):  # recomputed from their tokens: nothing generated was lost
        assert s.token_ids[:-1] == tokens_before[k] and s.num_computed_tokens == len(tokens_before[k])
    for s in (c, d, e):
        sched.finish(s, "stop")
    assert bm.num_free_blocks == bm.num_blocks


def test_samples_of_a_request_wait_for_the_leader_prompt() -> None:
    sched = make_scheduler(budget=4)
    prompt = list(range(10))
    leader = make_seq(prompt, request_id="req", index=0)
    follower = make_seq(prompt, request_id="req", index=1, leader=leader)
    sched.add(leader)
    sched.add(follower)
    for expect in ([(leader, 4, False)], [(leader, 4, False)], [(leader, 2, True)]):
        assert step(sched)[1] == expect
    _, items = step(sched)
    # The follower reuses the leader's two cached prompt blocks and computes only the rest.
    assert items == [(leader, 1, True), (follower, 2, True)]
    assert follower.block_table[:2] == leader.block_table[:2]
    assert follower.num_cached_tokens == 8
    assert sched.bm.prefix_hits == 8


def test_prompt_logprobs_take_no_cached_block_past_their_next_row() -> None:
    sched = make_scheduler()
    tokens = [next(_fresh_tokens) for _ in range(6 * BS + 1)]
    warm = make_seq(tokens, request_id="warm")
    sched.add(warm)
    step(sched)
    sched.finish(warm, "stop")  # its 6 full blocks stay findable

    def admit(seq: Sequence) -> int:
        sched.add(seq)
        _, items = step(sched)
        computed_before = seq.num_computed_tokens - items[0][1]
        sched.finish(seq, "stop")
        return computed_before

    plain = make_seq(tokens, request_id="plain")
    assert admit(plain) == 6 * BS
    asking = Sequence("ask", 0, list(tokens), len(tokens), SamplingParams(prompt_logprobs=1))
    assert admit(asking) == 0  # every row from position 0 is needed
    follower = Sequence("ask", 1, list(tokens), len(tokens), SamplingParams(prompt_logprobs=1))
    assert follower.prompt_logprobs is None and admit(follower) == 6 * BS  # sample 0 scores the prompt
    partial = Sequence("part", 0, list(tokens), len(tokens), SamplingParams(prompt_logprobs=1))
    assert partial.prompt_logprobs is not None
    partial.prompt_logprobs.extend([None] * (2 * BS + 2))  # type: ignore[list-item]  # entries 1..2*BS+2 exist
    assert partial.prompt_logprobs_next == 2 * BS + 3
    assert admit(partial) == 2 * BS  # row 2*BS+2 lies in block 2: the blocks before it come from the cache
    partial.prompt_logprobs.extend([None] * (len(tokens) - len(partial.prompt_logprobs) - 1))  # type: ignore[list-item]
    assert partial.prompt_logprobs_next is None and admit(partial) == 6 * BS  # nothing pending


def test_finish_frees_blocks_from_either_queue_and_is_idempotent() -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = make_seq(6, request_id="run"), make_seq(6, request_id="wait")
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert running.status is SeqStatus.RUNNING and waiting.status is SeqStatus.WAITING
    sched.finish(waiting, "abort")
    sched.finish(running, "stop")
    sched.finish(running, "abort")  # a late abort changes nothing
    assert running.finish_reason == "stop" and waiting.finish_reason == "abort"
    assert running.is_finished and waiting.is_finished
    assert not sched.has_work()
    assert sched.bm.num_free_blocks == sched.bm.num_blocks


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_cache_consistent_and_leaks_nothing(seed: int) -> None:
    """A mixed workload (shared prefixes, n > 1, priorities, aborts, preemptions) against a shadow
    KV cache: every token a step reads back must be the one written for that position."""
    rng = random.Random(seed)
    num_blocks = rng.randint(6, 16)
    sched = Scheduler(BlockManager(num_blocks, BS, rng.random() < 0.8), rng.randint(1, 4),
                      rng.choice([4, 8, 16]))
    bm = sched.bm
    kv: dict[tuple[int, int], int] = {}
    prefixes = [[rng.randrange(6) for _ in range(rng.randint(1, 10))] for _ in range(3)]
    live: list[Sequence] = []
    for t in range(400):
        if t < 200 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(6) for _ in range(rng.randint(0, 5))]
            params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randint(1, 6),
                                    priority=rng.choice([0, 0, 1]))
            assert params.max_tokens is not None
            if bm.blocks_for(len(prompt) + params.max_tokens) > num_blocks:
                continue
            group: list[Sequence] = []
            for i in range(params.n):
                seq = Sequence(f"r{t}", i, list(prompt), len(prompt), params,
                               leader=group[0] if group else None)
                group.append(seq)
                sched.add(seq)
            live += group
        if t < 200 and live and rng.random() < 0.05:
            victim = rng.choice(live)
            sched.finish(victim, "abort")
            live.remove(victim)
        if not sched.has_work():
            continue
        out = sched.schedule()
        assert out.scheduled or out.preempted, "work is queued but nothing was scheduled"
        assert out.num_tokens <= sched.max_num_batched_tokens
        for s in out.scheduled:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            samples = s.samples
            for pos in range(start):
                assert kv[seq.block_table[pos // BS], pos % BS] == seq.token_ids[pos]
            for pos in range(start, start + n):
                slot = (seq.block_table[pos // BS], pos % BS)
                assert bm._ref[slot[0]] == 1 or kv.get(slot) == seq.token_ids[pos], "shared block written"
                kv[slot] = seq.token_ids[pos]
            seq.num_computed_tokens += n
            bm.cache_computed(seq)
            if samples:
                seq.token_ids.append(rng.randrange(6))
                assert seq.params.max_tokens is not None
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
                    live.remove(seq)
        held = {b for s in sched.running for b in s.block_table}
        assert all(not s.block_table for s in sched.waiting)
        assert bm.num_free_blocks + len(held) == num_blocks
    assert not live, "every request must finish once arrivals stop"
    assert bm.num_free_blocks == num_blocks


def test_windowed_admission_drops_a_cached_prefix_that_cannot_fit() -> None:
    """All layers windowed (W = 4, 8-token budget): a new sequence whose cached prefix fills the
    whole cache is admitted without it (recomputing) rather than never; a prefix that fits is
    taken, and its blocks behind the first query's window are released at once."""
    from atomr_trio.engine.block_manager import RELEASED

    sched = Scheduler(BlockManager(4, BS, window=4), 8, 8)
    prompt = [next(_fresh_tokens) for _ in range(16)]
    a = make_seq(prompt, request_id="a")
    sched.add(a)
    step(sched)
    step(sched)  # all 16 computed: 4 full blocks cached
    sched.finish(a, "stop")
    b = make_seq(prompt + [7], request_id="b")  # 4 cached blocks + 1 token: 5 blocks > 4
    sched.add(b)
    out, _ = step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 8)]  # from position 0
    sched.finish(b, "stop")
    c = make_seq(prompt[:8] + [8], request_id="c")  # 2 cached blocks + 1 token: fits
    sched.add(c)
    out, _ = step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(c, 1)]
    assert c.block_table[0] == RELEASED and c.block_table[1] != RELEASED  # query 8 sees 5..8
