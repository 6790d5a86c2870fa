"""Prompt logprobs and prompt-only scoring (max_tokens=0).

On a tiny random Llama (fast): every entry equals transformers' float32 log-softmax of one full
forward over the prompt, however the engine computed it — one chunk, small chunks, behind a warm
prefix cache, preempted and recomputed, for n > 1 — and each entry is computed exactly once.
On the default model (real_model): the same within 1e-4, with chunking and with preemption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import core_of, worker_of

from atomr_trio import LLM, SamplingParams, open_engine
from atomr_trio.executor import model_runner
from atomr_trio.outputs import RequestOutput

BS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_hf_dir import write_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_model(path, "llama", seed=3)
    return path


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir: Path) -> Callable[[list[int]], torch.Tensor]:
    """transformers' float32 log-softmax of every position of one full forward over `ids`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def want(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return want


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir: Path) -> Iterator[LLM]:
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=BS) as llm:
        yield llm


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * j + 13 * salt) % 250 + 3 for j in range(n)]


def check(out: RequestOutput, want: torch.Tensor, k: int, tol: float = 1e-4) -> None:
    """out.prompt_logprobs against the reference rows `want` ([P, vocab] log-softmax)."""
    ids = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        entry, row, tok = plp[i], want[i - 1], ids[i]
        assert entry is not None and next(iter(entry)) == tok  # the prompt token's own entry first
        own = entry[tok]
        assert own.logprob == pytest.approx(float(row[tok]), abs=tol), i
        assert own.rank is not None  # 1 + the tokens scoring higher (near-ties within tol either way)
        assert int((row > row[tok] + tol).sum()) + 1 <= own.rank <= int((row > row[tok] - tol).sum()) + 1, i
        top = sorted((x.rank, t, x.logprob) for t, x in entry.items() if x.rank is not None and x.rank <= k)
        assert [r for r, _, _ in top] == list(range(1, k + 1))
        ref_v = row.topk(k).values if k else row[:0]
        assert [v for _, _, v in top] == pytest.approx(ref_v.tolist(), abs=tol)  # the k best values ...
        assert [v for _, _, v in top] == pytest.approx([float(row[t]) for _, t, _ in top], abs=tol)  # ... of these ids
        assert len(entry) == k + (own.rank > k)


def same(a: RequestOutput, b: RequestOutput, tol: float = 0.0) -> None:
    assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
    assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
        assert x is not None and y is not None and list(x) == list(y)
        for t in x:
            assert x[t].rank == y[t].rank and abs(x[t].logprob - y[t].logprob) <= tol


def count_rows(llm: LLM) -> list[int]:
    """Wrap the runner so that the number of prompt-logprob rows each step computed is recorded."""
    runner = worker_of(llm).context.runner  # type: ignore[union-attr]
    rows: list[int] = []
    inner = runner._prompt_logprobs

    def counted(*args: Any) -> Any:
        out = inner(*args)
        rows.append(sum(len(v) for v in out.values()))
        return out

    runner._prompt_logprobs = counted  # type: ignore[method-assign]
    return rows


LENGTHS = [1, 2, BS, BS + 1, 2 * BS + 1, 45, 100]


def test_every_prompt_row_in_one_chunk_or_many(tiny_dir: Path, tiny_ref, tiny_llm: LLM, monkeypatch) -> None:
    prompts = [{"prompt_token_ids": prompt(n, salt=n)} for n in LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=(0, 3)[i % 2], prompt_logprobs=(0, 2, 5)[i % 3],
                             ignore_eos=True) for i in range(len(LENGTHS))]
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    rows = count_rows(tiny_llm)
    whole = tiny_llm.generate(prompts + prompts[-1:], params + [plain], use_tqdm=False)
    assert whole[-1].prompt_logprobs is None  # who does not ask pays nothing
    for out, p in zip(whole, params, strict=False):
        check(out, tiny_ref(out.prompt_token_ids), p.prompt_logprobs or 0)
        assert len(out.outputs[0].token_ids) == p.max_tokens
        assert out.outputs[0].finish_reason == "length"
    assert sum(rows) == sum(n - 1 for n in LENGTHS)  # each entry computed once

    # The same with chunks of at most 16 tokens (the budget is shared, so chunk boundaries fall
    # anywhere in a prompt) and logits in slices of 7 rows.
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 7)
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=BS, max_num_batched_tokens=16) as llm:
        chunked = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(whole, chunked, strict=False):
        same(a, b, tol=1e-5)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_prefix_cache_is_skipped_for_rows_and_still_filled(tiny_ref, tiny_llm: LLM) -> None:
    a = prompt(60, salt=101)
    score = SamplingParams(max_tokens=0, prompt_logprobs=1)
    plain = SamplingParams(temperature=0, max_tokens=1)
    warm = tiny_llm.generate({"prompt_token_ids": a}, plain, use_tqdm=False)[0]
    assert warm.num_cached_tokens == 0
    first = tiny_llm.generate({"prompt_token_ids": a}, score, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0  # cached blocks hold no logits: not taken
    check(first, tiny_ref(a), 1)
    second = tiny_llm.generate({"prompt_token_ids": a}, score, use_tqdm=False)[0]
    same(first, second)  # bit for bit

    b = a[:50] + prompt(20, salt=102)  # shares 6 full blocks with a
    shared = tiny_llm.generate({"prompt_token_ids": b}, score, use_tqdm=False)[0]
    check(shared, tiny_ref(b), 1)
    for x, y in zip(first.prompt_logprobs[1:50], shared.prompt_logprobs[1:50], strict=True):  # type: ignore[index]
        assert x is not None and y is not None
        assert all(abs(x[t].logprob - y[t].logprob) <= 1e-5 for t in x)

    c = prompt(40, salt=103)  # first seen by a request that asks: it still fills the cache
    tiny_llm.generate({"prompt_token_ids": c}, score, use_tqdm=False)
    again = tiny_llm.generate({"prompt_token_ids": c}, plain, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(c) - 1) // BS * BS


def test_n_samples_share_one_scored_prompt(tiny_ref, tiny_llm: LLM) -> None:
    p = prompt(37, salt=7)
    rows = count_rows(tiny_llm)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    out = tiny_llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
    check(out, tiny_ref(p), 2)
    assert [len(o.token_ids) for o in out.outputs] == [4, 4, 4]
    assert sum(rows) == len(p) - 1  # computed once, by sample 0
    scored = tiny_llm.generate({"prompt_token_ids": p}, SamplingParams(n=2, max_tokens=0, prompt_logprobs=2),
                               use_tqdm=False)[0]
    assert [(o.token_ids, o.text, o.finish_reason) for o in scored.outputs] == [([], "", "length")] * 2
    same(out, scored)


def test_preemption_neither_repeats_nor_loses_entries(tiny_dir: Path, tiny_ref) -> None:
    prompts = [prompt(40 + 3 * i, salt=200 + i) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    # 16 blocks x 8 = 128 tokens of KV for 8 requests of ~100 tokens each, prefilled 16 at a time.
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=16, block_size=BS, max_num_batched_tokens=16) as llm:
        core = core_of(llm)
        pending_at_preemption: list[int] = []
        preempt = core.scheduler._preempt

        def spy(seq: Any) -> None:
            if seq.prompt_logprobs_next is not None:
                pending_at_preemption.append(seq.prompt_logprobs_next)
            preempt(seq)

        core.scheduler._preempt = spy  # type: ignore[method-assign]
        rows = count_rows(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.stats()["num_preemptions"] > 0
    assert pending_at_preemption  # some were preempted in the middle of their prompt
    assert sum(rows) == sum(len(p) - 1 for p in prompts)
    for out in outs:
        check(out, tiny_ref(out.prompt_token_ids), 1)
        assert len(out.outputs[0].token_ids) == 40


async def test_async_deltas_carry_the_prompt_logprobs_once(tiny_dir: Path, tiny_ref) -> None:
    p = prompt(30, salt=9)
    async with open_engine(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=BS,
                           max_num_batched_tokens=8) as engine:
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=0)
        deltas = [d async for d in engine.generate(None, params, prompt_ids=p, delta=True)]
        final = await engine.generate_one(None, params, prompt_ids=p)
        one_token = await engine.generate_one(None, SamplingParams(max_tokens=0, prompt_logprobs=3), prompt_ids=p[:1])
    with_lp = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_lp) == 1 and with_lp[0] is deltas[0]  # with the first token
    check(with_lp[0], tiny_ref(p), 0)
    same(with_lp[0], final)
    assert one_token.prompt_logprobs == [None]


# ---- the default model (float32), against transformers ------------------------------------------

STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
         "woodcutter and his three children. Every morning the woodcutter walked into the forest with "
         "his axe, and every evening he came home tired, with a bundle of wood on his back.")


@pytest.mark.real_model
def test_default_model_in_small_chunks_matches_transformers(make_llm, reference) -> None:
    llm = make_llm(dtype="float32", max_model_len=2048, num_kv_blocks=256, block_size=64, max_num_batched_tokens=16)
    ids = llm.get_tokenizer().encode(STORY)
    assert len(ids) > 3 * 16
    out = llm.generate(STORY, SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    check(out, reference.prompt_logprobs(ids), 2)


@pytest.mark.real_model
def test_default_model_preempted_matches_transformers(reference) -> None:
    texts = [STORY[: 120 + 40 * i] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    # 12 blocks x 16 = 192 tokens of KV for 4 requests of 50-80 tokens each.
    with LLM(dtype="float32", max_model_len=512, num_kv_blocks=12, block_size=16, max_num_batched_tokens=32) as llm:
        rows = count_rows(llm)
        outs = llm.generate(texts, params, use_tqdm=False)
        assert llm.stats()["num_preemptions"] > 0
    assert sum(rows) == sum(len(o.prompt_token_ids) - 1 for o in outs)
    for out in outs:
        check(out, reference.prompt_logprobs(out.prompt_token_ids), 1)
        assert out.outputs[0].token_ids == reference.greedy(out.prompt_token_ids, 24)[0]
