"""The CUDA path, on a GPU: greedy parity with transformers in float32 (a tiny random model written
here, and the SmolLM2-shaped random model of benchmarks/gpu_model.py when ATOMR_TRIO_GPU_MODEL
points at it), one request at a time against one batch, CUDA graphs against --enforce-eager,
bfloat16 against float32, the KV cache sized by gpu_memory_utilization, and the weights on the
GPU. Every test is marked `cuda` and skipped where torch sees no GPU (plain `pytest` on a CPU
machine lists them as skipped); `bash benchmarks/gpu_check.sh` runs them on a GPU machine.

Every engine here but the one that measures gpu_memory_utilization is given num_kv_blocks: the
default sizing takes 90% of the GPU, which leaves nothing for a second engine or transformers.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from atomr_trio import LLM, SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

GPU_MODEL_ENV = "ATOMR_TRIO_GPU_MODEL"  # a directory written by benchmarks/gpu_model.py (export + weights)
N_NEW = 48
TINY_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4,",
    "def f(x):\n    return",
    "<|im_start|>user\nWhat is a GPU?<|im_end|>\n<|im_start|>assistant\n",
    "a" * 40,
    "Paged attention keeps the KV cache in fixed-size blocks",
    "z",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)


def _free_gpu() -> None:
    """Give the memory of closed engines and dropped models back to the GPU, so the next engine
    measures the GPU's free memory, not what torch's caching allocator still holds."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@torch.no_grad()
def greedy_reference(model: Any, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens for one prompt: argmax of the last logits, n times, with its
    KV cache; EOS is a token like any other (the engine runs with ignore_eos)."""
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        token = int(out.logits[0, -1].float().argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to("cuda").eval()


def _ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(p) for p in prompts]


def _generate(llm: LLM, prompts: list[str], params: SamplingParams = GREEDY, one_at_a_time: bool = False
              ) -> list[list[int]]:
    if one_at_a_time:
        outs = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _check_parity(llm: LLM, model_dir: Path, prompts: list[str]) -> None:
    """Batched and one at a time, the engine's greedy ids are transformers' (float32, on the GPU)."""
    batched = _generate(llm, prompts)
    single = _generate(llm, prompts, one_at_a_time=True)
    ref_model = _hf_model(model_dir)
    try:
        for prompt, ids, b, s in zip(prompts, _ids(llm, prompts), batched, single, strict=True):
            want = greedy_reference(ref_model, ids, N_NEW)
            assert b == want, f"batched, prompt {prompt!r}"
            assert s == want, f"one at a time, prompt {prompt!r}"
    finally:
        del ref_model
        _free_gpu()


# ---- models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_hf_dir's tiny random models: Qwen2 with q/k/v biases, Llama with tied embeddings."""
    from test_hf_dir import write_tiny_model

    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    write_tiny_model(path, request.param, seed=11)
    return path


@pytest.fixture(scope="module")
def gpu_model_dir() -> Path:
    value = os.environ.get(GPU_MODEL_ENV)
    if not value:
        pytest.skip(f"{GPU_MODEL_ENV} is not set (a directory from benchmarks/gpu_model.py export + weights)")
    path = Path(value)
    if not (path / "config.json").is_file():
        pytest.skip(f"{GPU_MODEL_ENV}={value}: no config.json there")
    return path


def _llm(model_dir: Path, **settings: Any) -> LLM:
    """An engine on the GPU; few sequences per step (the tests batch at most 8), so that it
    captures few CUDA graphs and starts fast."""
    return LLM(str(model_dir), **{"device": "cuda", "num_kv_blocks": 512, "max_num_seqs": 16, **settings})


@pytest.fixture(scope="module")
def tiny32(tiny_dir: Path) -> Iterator[LLM]:
    """The tiny model in float32 on the GPU, shared by the tests of one tiny model."""
    with _llm(tiny_dir, dtype="float32") as llm:
        yield llm
    _free_gpu()


# ---- parity ---------------------------------------------------------------------------------
def test_greedy_parity_tiny_float32(tiny32: LLM, tiny_dir: Path) -> None:
    assert tiny32.engine.config.device.startswith("cuda")
    _check_parity(tiny32, tiny_dir, TINY_PROMPTS)


def test_greedy_parity_smollm2_shape_float32(gpu_model_dir: Path) -> None:
    """The default model's architecture (30 layers, 9 heads, 3 KV heads, vocab 49152) with random
    weights: 8 prompts x 48 tokens, batched and one at a time."""
    from test_parity import PROMPTS

    with _llm(gpu_model_dir, dtype="float32", num_kv_blocks=1024, max_model_len=2048) as llm:
        _check_parity(llm, gpu_model_dir, PROMPTS)
    _free_gpu()


def test_one_at_a_time_equals_batched(tiny32: LLM) -> None:
    """Different batch compositions (and so different decode graphs) give the same greedy ids."""
    batched = _generate(tiny32, TINY_PROMPTS)
    single = _generate(tiny32, TINY_PROMPTS, one_at_a_time=True)
    pairs = _generate(tiny32, TINY_PROMPTS[:2]) + _generate(tiny32, TINY_PROMPTS[2:5]) + \
        _generate(tiny32, TINY_PROMPTS[5:])
    assert batched == single
    assert batched == pairs


def _graphs_vs_eager(model_dir: Path, prompts: list[str], **settings: Any) -> None:
    results = {}
    for eager in (False, True):
        with _llm(model_dir, dtype="float32", enforce_eager=eager, **settings) as llm:
            assert llm.engine.config.enforce_eager is eager
            results[eager] = (_generate(llm, prompts), _generate(llm, prompts[:3], one_at_a_time=True))
        _free_gpu()
    assert results[False] == results[True]


def test_cuda_graphs_match_eager_tiny(tiny_dir: Path) -> None:
    """CUDA graphs for decode steps change nothing in float32: the same greedy ids as eager steps,
    batched and one at a time."""
    _graphs_vs_eager(tiny_dir, TINY_PROMPTS)


def test_cuda_graphs_match_eager_smollm2_shape(gpu_model_dir: Path) -> None:
    from test_parity import PROMPTS

    _graphs_vs_eager(gpu_model_dir, PROMPTS, num_kv_blocks=1024, max_model_len=2048)


def test_bf16_first_tokens_agree_with_float32(tiny32: LLM, tiny_dir: Path) -> None:
    """bfloat16 runs on the GPU and stays close to float32: its first token is float32's top
    token for most prompts and among float32's top 5 for every prompt."""
    first = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    ref = tiny32.generate(TINY_PROMPTS, first, use_tqdm=False)
    with _llm(tiny_dir, dtype="bfloat16") as llm:
        assert llm.engine.config.dtype == "bfloat16"
        got = llm.generate(TINY_PROMPTS, first, use_tqdm=False)
        longer = _generate(llm, TINY_PROMPTS[:2])  # bf16 decoding steps (graphs) run too
    _free_gpu()
    same = 0
    for prompt, r, g in zip(TINY_PROMPTS, ref, got, strict=True):
        token = g.outputs[0].token_ids[0]
        same += token == r.outputs[0].token_ids[0]
        assert token in r.outputs[0].logprobs[0], (prompt, token)
    assert same >= len(TINY_PROMPTS) - 2, f"{same} of {len(TINY_PROMPTS)} first tokens agree"
    assert all(len(ids) == N_NEW for ids in longer)


# ---- memory and placement ---------------------------------------------------------------------
def test_kv_blocks_follow_gpu_memory_utilization(tiny_model_dir: Path) -> None:
    """Without num_kv_blocks, the KV cache gets what gpu_memory_utilization leaves: a smaller
    share gives fewer blocks, and the cache never exceeds the share."""
    _free_gpu()
    free, total = torch.cuda.mem_get_info()
    if free < 0.5 * total:
        pytest.skip(f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB free: another process holds the GPU")
    blocks = {}
    for utilization in (0.2, 0.4):
        # large blocks: a tiny model's 4 KiB blocks would make the block manager's tables take seconds
        with LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=utilization,
                 max_num_seqs=16, block_size=256) as llm:
            cfg = llm.engine.config
            blocks[utilization] = llm.stats()["num_kv_blocks"]
            block_bytes = cfg.kv_block_bytes(llm.engine.source.config)
            assert _generate(llm, TINY_PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4))
        _free_gpu()
        kv_bytes = blocks[utilization] * block_bytes
        assert kv_bytes <= utilization * total
        assert kv_bytes >= 0.5 * utilization * total, (utilization, blocks[utilization])  # a tiny model's weights
    assert blocks[0.2] < blocks[0.4]


def test_weights_live_on_the_gpu(tiny_model_dir: Path) -> None:
    """A model on cuda:0 puts its weights (and KV cache) in that GPU's memory; dtype auto is
    bfloat16 there. On the SmolLM2-shaped model when there is one (270 MB of bf16 weights)."""
    from atomr_trio.engine.memory_plan import weight_bytes

    model_dir = Path(os.environ.get(GPU_MODEL_ENV) or tiny_model_dir)
    _free_gpu()
    before = torch.cuda.memory_allocated(0)
    with _llm(model_dir, device="cuda:0", num_kv_blocks=64, max_model_len=512) as llm:
        stats = llm.stats()
        cfg = llm.engine.config
        assert cfg.device == "cuda:0"
        assert cfg.dtype == "bfloat16"
        assert stats["worker"]["device"] == "cuda:0"
        assert stats["num_kv_blocks"] == 64
        grown = torch.cuda.memory_allocated(0) - before
        model = llm.engine.source.config
        want = weight_bytes(model, 2) + 64 * cfg.kv_block_bytes(model)
        assert grown >= want, (grown, want)
        assert _generate(llm, ["Hello"], SamplingParams(temperature=0.0, max_tokens=4))
    _free_gpu()
