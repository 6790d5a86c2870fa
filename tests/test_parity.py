"""Greedy token parity with transformers on the default model (float32): one request at a
time, all in one batch, with small prefill chunks, with a warm prefix cache, and on each CPU
kernel path; bfloat16 next-token distributions close to float32 on each path."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_path_unavailable

from atomr_trio import LLM, SamplingParams
from atomr_trio.model import cpu_kernels

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

N_NEW = 48
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three children. Every morning the woodcutter",
    "Here is a list of the planets of the solar system, in order from the sun:",
    "Q: Why is the sky blue?\nA:",
    "Translate to French: 'The weather is nice today, and I would like to go for a long walk "
    "by the river with my friends before dinner.'\nFrench:",
    "1, 2, 3, 4, 5,",
    "In machine learning, the attention mechanism lets a model weigh different parts of its input "
    "when producing each part of its output. The key idea of self-attention is that",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, logprobs=2)


def _check(llm: LLM, reference, outs) -> None:
    tok = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        want, _ = reference.greedy(ids, N_NEW)
        assert out.outputs[0].token_ids == want, prompt


def test_greedy_parity_one_at_a_time(llm32: LLM, reference) -> None:
    outs = [llm32.generate(p, GREEDY, use_tqdm=False)[0] for p in PROMPTS]
    _check(llm32, reference, outs)


def test_greedy_parity_one_batch(llm32: LLM, reference) -> None:
    outs = llm32.generate(PROMPTS, GREEDY, use_tqdm=False)
    _check(llm32, reference, outs)


@pytest.mark.parametrize("path", ["native", "torch"])  # float32 has these two: ops native or not
def test_greedy_parity_on_each_kernel_path(path: str, monkeypatch, reference) -> None:
    """Each forced CPU kernel path (torch: what runs without a compiler) keeps float32 parity."""
    why = kernel_path_unavailable(path, torch.float32)
    if why:
        pytest.skip(f"{path} kernel path unavailable here: {why}")
    monkeypatch.setenv(cpu_kernels.ENV, path)
    with LLM(dtype="float32", max_model_len=2048, num_kv_blocks=128, block_size=64) as llm:
        assert llm.stats()["kernels"] == f"matmul=torch, ops={path}"
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        _check(llm, reference, outs)


def test_greedy_parity_small_prefill_chunks(make_llm, reference) -> None:
    llm = make_llm(dtype="float32", max_model_len=2048, num_kv_blocks=256, block_size=64, max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    _check(llm, reference, outs)
    assert max(len(o.prompt_token_ids) for o in outs) > 16  # chunking really happened


def test_greedy_parity_warm_prefix_cache(make_llm, reference) -> None:
    llm = make_llm(dtype="float32", max_model_len=2048, num_kv_blocks=1024, block_size=8)
    cold = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    warm = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    _check(llm, reference, warm)
    for c, w in zip(cold, warm, strict=True):
        assert c.outputs[0].token_ids == w.outputs[0].token_ids
        # every full block of the prompt but the one holding the last token comes from the cache
        assert w.num_cached_tokens == (len(w.prompt_token_ids) - 1) // 8 * 8
    assert sum(w.num_cached_tokens for w in warm) > 0


def test_greedy_logprobs_match_transformers(llm32: LLM, reference) -> None:
    outs = llm32.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    tok = llm32.get_tokenizer()
    for prompt, out in zip(PROMPTS[:3], outs, strict=True):
        _, ref_lps = reference.greedy(tok.encode(prompt), N_NEW)
        sample = out.outputs[0]
        assert sample.logprobs is not None and len(sample.logprobs) == N_NEW
        for tid, entry, ref in zip(sample.token_ids, sample.logprobs, ref_lps, strict=True):
            lp = entry[tid]
            assert lp.rank == 1  # a greedy token is the row maximum
            assert lp.logprob == pytest.approx(float(ref.max()), abs=1e-4)
            assert lp.logprob == pytest.approx(float(ref[tid]), abs=1e-4)
            top = sorted(entry.values(), key=lambda x: x.rank or 0)
            assert [x.rank for x in top] == [1, 2]
            second = torch.topk(ref, 2).values[1]
            assert top[1].logprob == pytest.approx(float(second), abs=1e-4)


def _first_token_logprob_error(llm: LLM, reference) -> tuple[int, float]:
    """(how many prompts pick transformers' float32 first token, worst |logprob| gap of the
    engine's top-5 candidates against the float32 reference)."""
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    same, worst = 0, 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want, ref_lp = reference.greedy(tok.encode(prompt), 1)
        same += out.outputs[0].token_ids[0] == want[0]
        for token, lp in out.outputs[0].logprobs[0].items():
            worst = max(worst, abs(lp.logprob - float(ref_lp[0][token])))
    return same, worst


_torch_bf16_error: list[tuple[int, float]] = []


def test_bf16_first_tokens_stay_close_to_float32(kernel_path: str, monkeypatch, reference) -> None:
    """bfloat16 cannot match float32 token for token over long runs, but the next-token
    distribution must stay close on every kernel path, and no path may be much worse than bf16
    on plain torch ops."""
    with LLM(dtype="bfloat16", max_model_len=1024, num_kv_blocks=256) as llm:
        assert llm.stats()["kernels"].startswith(f"matmul={kernel_path}")
        same, err = _first_token_logprob_error(llm, reference)
    if kernel_path == "torch" and not _torch_bf16_error:
        _torch_bf16_error.append((same, err))
    if not _torch_bf16_error:
        monkeypatch.setenv(cpu_kernels.ENV, "torch")
        with LLM(dtype="bfloat16", max_model_len=1024, num_kv_blocks=256) as llm:
            _torch_bf16_error.append(_first_token_logprob_error(llm, reference))
    same_torch, torch_err = _torch_bf16_error[0]
    assert same >= len(PROMPTS) - 1 and same_torch >= len(PROMPTS) - 1
    assert err < 0.5, err
    assert err <= 1.5 * torch_err + 0.05, (err, torch_err)
