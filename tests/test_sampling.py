"""Sampling on the real model: seeds, top-k, stop strings, n > 1, penalties, bias, min_tokens."""

from __future__ import annotations

from collections import Counter

import pytest

from atomr_trio import LLM, SamplingParams

pytestmark = pytest.mark.real_model

PROMPT = "Write a short poem about the sea:"


def _ids(out) -> list[int]:
    return out.outputs[0].token_ids


def test_same_seed_same_tokens_alone_and_in_a_mixed_batch(llm32: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm32.generate(PROMPT, seeded, use_tqdm=False)[0]
    again = llm32.generate(PROMPT, seeded, use_tqdm=False)[0]
    assert _ids(alone) == _ids(again)

    others = [
        SamplingParams(temperature=0.0, max_tokens=20),
        SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, top_k=40, max_tokens=24),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, max_tokens=16),
        SamplingParams(temperature=0.7, min_p=0.1, max_tokens=12, logprobs=3),
    ]
    params = [others[i % len(others)] for i in range(15)]
    prompts = [f"Prompt number {i}: tell me something." for i in range(15)]
    params.insert(7, seeded)
    prompts.insert(7, PROMPT)
    batch = llm32.generate(prompts, params, use_tqdm=False)
    assert _ids(batch[7]) == _ids(alone)

    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=24, ignore_eos=True)
    assert _ids(llm32.generate(PROMPT, other_seed, use_tqdm=False)[0]) != _ids(alone)


def test_top_k_1_equals_greedy(llm32: LLM) -> None:
    greedy = llm32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                            use_tqdm=False)[0]
    top1 = llm32.generate(PROMPT, SamplingParams(temperature=1.0, top_k=1, max_tokens=32, ignore_eos=True),
                          use_tqdm=False)[0]
    assert _ids(top1) == _ids(greedy)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_exactly(llm32: LLM, include: bool) -> None:
    full = llm32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert len(stop) == 4 and full.find(stop) > 0
    out = llm32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=include), use_tqdm=False)[0]
    o = out.outputs[0]
    cut = full.index(stop) + (len(stop) if include else 0)
    assert o.text == full[:cut]
    assert o.finish_reason == "stop" and o.stop_reason == stop


def test_n_samples_share_the_prompt_and_differ(llm32: LLM) -> None:
    prompt = ("List three unusual hobbies that people enjoy on weekends, with a reason for each one, "
              "and say which of them costs the least money and which needs the most free time. " * 5
              + "Answer:")
    before = llm32.stats()
    out = llm32.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0]
    after = llm32.stats()
    texts = [o.text for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 16 for o in out.outputs)
    assert len(set(texts)) > 1
    # samples 1..3 found sample 0's full prompt blocks in the cache
    block = llm32.engine.config.resolved_block_size()
    full_blocks = (len(out.prompt_token_ids) - 1) // block * block
    assert full_blocks >= 2 * block
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 3 * full_blocks


def _repeats(ids: list[int]) -> int:
    return sum(c - 1 for c in Counter(ids).values())


# Presence penalty is a flat cost per token already generated, so greedy decoding of a loop does
# not always leave it; its exact effect on logits is checked in test_sampler.py.
@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.5}, {"repetition_penalty": 1.5}])
def test_penalties_reduce_repetition(llm32: LLM, penalty: dict) -> None:
    prompt = "1, 2, 1, 2, 1, 2, 1, 2, 1, 2,"
    base = llm32.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0]
    pen = llm32.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, **penalty),
                         use_tqdm=False)[0]
    assert _repeats(_ids(pen)) < _repeats(_ids(base))


def test_logit_bias_forces_a_token(llm32: LLM) -> None:
    tok = llm32.get_tokenizer()
    target = tok.encode(" banana")[0]
    out = llm32.generate(PROMPT, SamplingParams(temperature=0.8, max_tokens=5, logit_bias={target: 100}),
                         use_tqdm=False)[0]
    assert _ids(out) == [target] * 5


def test_min_tokens_holds_back_eos(llm32: LLM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    short = llm32.chat(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    long = llm32.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=20),
                      use_tqdm=False)[0].outputs[0]
    assert len(long.token_ids) >= 20
    eos = set(llm32.get_tokenizer().eos_token_ids)
    assert not eos & set(long.token_ids[:19])


def test_max_tokens_and_eos_finish_reasons(llm32: LLM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = llm32.chat(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    cut = llm32.chat(chat, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
