"""The GPU path's device-agnostic pieces, on the CPU: the graph ladder and its padding, decode
attention through block tables, decode steps replayed through DecodeGraphs' static buffers
(the same tokens and logprobs as the eager step, padded rows or not), the KV-cache arithmetic
of gpu_memory_utilization, the profiling batch, the engine taking the block count its Context
measured, and the device setting."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from atomr_trio import SamplingParams
from atomr_trio.async_llm import engine_config
from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.engine.memory_plan import MemoryPlanError, plan_kv_cache, weight_bytes
from atomr_trio.executor import worker as worker_module
from atomr_trio.executor.context import Context
from atomr_trio.executor.cuda_graphs import DecodeGraphs, capture_sizes, padded_size
from atomr_trio.executor.device_memory import profile_batches
from atomr_trio.executor.model_runner import BatchItem, ModelRunner, StepBatch
from atomr_trio.executor.sampler import SampleRow
from atomr_trio.model.attention import AttentionMetadata, paged_attention, table_decode_torch
from atomr_trio.model_source import ModelSource

GiB = 1 << 30


# ---- the graph ladder ----------------------------------------------------------------------
def test_the_ladder_covers_every_batch_up_to_its_top_and_pads_to_the_next_size() -> None:
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]  # the engine's own limit is a size of its own
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1000)[-1] == 256
    sizes = capture_sizes(64)
    assert [padded_size(n, sizes) for n in (1, 3, 5, 9, 63, 64, 65)] == [1, 4, 8, 16, 64, 64, None]
    for n in range(1, 65):
        size = padded_size(n, sizes)
        assert size is not None and size >= n and size - n < 8


# ---- decode attention through block tables -------------------------------------------------
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0), (7, 20.0)])
def test_table_decode_matches_the_gather_path(window: int | None, softcap: float | None) -> None:
    torch.manual_seed(0)
    H, KVH, D, bs, blocks = 6, 2, 16, 4, 24
    kv = torch.randn(2, KVH, blocks * bs, D)
    lens = [1, 4, 9, 17]
    perm = torch.randperm(blocks).tolist()  # blocks scattered over the cache
    tables, at = [], 0
    for n in lens:
        k = -(-n // bs)
        tables.append(perm[at : at + k])
        at += k
    q = torch.randn(len(lens), H, D)
    width = max(map(len, tables)) + 2  # wider than any row needs: columns past a context are never read
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    got = table_decode_torch(q, kv, table, torch.tensor(lens, dtype=torch.int32), bs, D**-0.5, window, softcap)
    L = max(lens)
    slots = torch.tensor([[t[p // bs] * bs + p % bs if p < n else 0 for p in range(L)]
                          for t, n in zip(tables, lens, strict=True)])
    bias = torch.zeros(1, len(lens), 1, L)
    bias.masked_fill_((torch.arange(L) >= torch.tensor(lens).unsqueeze(1)).view(1, -1, 1, L), float("-inf"))
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decode=len(lens),
                             decode_slots=slots.reshape(-1), decode_bias=bias, prefills=[],
                             decode_ctx_lens=torch.tensor(lens))
    want = paged_attention(q, q[:, :KVH], q[:, :KVH], kv, meta, write_kv=False, window=window, softcap=softcap)
    torch.testing.assert_close(got.reshape(len(lens), H * D), want, atol=1e-5, rtol=1e-5)


def test_a_padding_row_reads_nothing_and_gets_zeros() -> None:
    kv = torch.full((2, 1, 8, 4), float("nan"))
    kv[:, :, :4] = 1.0
    out = table_decode_torch(torch.ones(2, 2, 4), kv, torch.tensor([[0, 1], [0, 0]], dtype=torch.int32),
                             torch.tensor([3, 0], dtype=torch.int32), 4, 0.5, None, None)
    assert torch.equal(out[0], torch.ones(2, 4)) and torch.equal(out[1], torch.zeros(2, 4))


# ---- decode steps through the graphs' static buffers ---------------------------------------
def _context(source: ModelSource) -> Context:
    cfg = engine_config(dtype="float32", num_kv_blocks=64, block_size=8, max_model_len=256, max_num_seqs=8,
                        torch_threads=1).resolve(source.config)
    return Context(source, cfg)


def _drive(runner: ModelRunner, prompts: list[list[int]], steps: int, bs: int = 8,
           on_launch: Callable[[], None] | None = None) -> list[list[tuple[int, float]]]:
    """Prefill the prompts in one step, then decode `steps` greedy steps for all of them (the last
    two sequences stop half-way, so batches shrink); each sample's (token, logprob) in order."""
    per = 64 // len(prompts)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    got: list[list[tuple[int, float]]] = [[] for _ in prompts]
    row = SampleRow(SamplingParams(temperature=0.0, logprobs=0, max_tokens=steps + 1), None, None, None, 0)
    live = list(range(len(prompts)))
    for step in range(steps + 1):
        if step == steps // 2:
            live = live[:-2]
        items = [BatchItem(i, seqs[i] if step == 0 else seqs[i][-1:], 0 if step == 0 else len(seqs[i]) - 1,
                           tables[i][: -(-len(seqs[i]) // bs)], row) for i in live]
        out = runner.execute(StepBatch(items), on_launch)
        for seq_id, tok, lp in zip(out.seq_ids, out.sampled.token_ids, out.sampled.logprobs, strict=True):
            assert lp is not None
            seqs[seq_id].append(tok)
            got[seq_id].append((tok, lp.logprob))
    return got


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_replayed_decode_steps_match_eager_ones(arch: str, tmp_path: Path) -> None:
    from test_hf_dir import write_tiny_model

    write_tiny_model(tmp_path, arch, seed=3)
    source = ModelSource.open(str(tmp_path))
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(5 + 7 * i)] for i in range(5)]  # 5 rows: padded to 8
    want = _drive(_context(source).runner, prompts, steps=24)
    ctx = _context(source)
    runner = ctx.runner
    runner.table_op = table_decode_torch
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 8, table_decode_torch, capture_sizes(8),
                                 max_blocks=32, scratch_slot=63 * 8, cuda=False)
    graphs = runner.graphs
    launched: list[list[int]] = []  # the graphs' token inputs whenever a step hands over
    got = _drive(runner, prompts, steps=24, on_launch=lambda: launched.append(graphs.ids.tolist()))
    assert [[t for t, _ in g] for g in got] == [[t for t, _ in w] for w in want]
    assert len(launched) == 25  # once per step, the prefill's included
    assert launched[1][:5] == [g[0][0] for g in got]  # a replay hands over once its inputs are in
    assert max(abs(a[1] - b[1]) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)) < 1e-4


# ---- the KV cache from gpu_memory_utilization ---------------------------------------------
def test_the_cache_gets_what_the_budget_leaves() -> None:
    plan = plan_kv_cache(total=80 * GiB, free_at_start=79 * GiB, weights=2 * GiB, activations=1 * GiB,
                         other=GiB // 2, utilization=0.9, block_bytes=1 << 20, block_tokens=16)
    assert plan.budget == int(72 * GiB)
    assert plan.blocks == (72 * GiB - 3 * GiB - GiB // 2) // (1 << 20)
    assert plan.kv_bytes == plan.blocks * (1 << 20)
    assert f"{plan.blocks} blocks, {plan.blocks * 16} tokens" in plan.describe()
    smaller = plan_kv_cache(total=80 * GiB, free_at_start=79 * GiB, weights=2 * GiB, activations=1 * GiB,
                            other=0, utilization=0.5, block_bytes=1 << 20, block_tokens=16)
    assert smaller.blocks < plan.blocks


def test_a_budget_the_gpu_cannot_give_names_the_numbers() -> None:
    with pytest.raises(MemoryPlanError, match="asks for 72.00 GiB.*only 40.00 GiB were free.*lower gpu_memory_util"):
        plan_kv_cache(total=80 * GiB, free_at_start=40 * GiB, weights=GiB, activations=GiB, other=0,
                      utilization=0.9, block_bytes=1 << 20, block_tokens=16)
    with pytest.raises(MemoryPlanError, match="no room for the KV cache.*weights take 7.50"):
        plan_kv_cache(total=10 * GiB, free_at_start=10 * GiB, weights=15 * GiB // 2, activations=GiB, other=0,
                      utilization=0.8, block_bytes=1 << 20, block_tokens=16)


def test_weight_bytes_from_the_shapes_match_the_loaded_model(tiny_source: ModelSource) -> None:
    ctx = _context(tiny_source)
    model = ctx.runner.model
    tensors = [model.embed, model.norm, *(t for layer in model.layers
                                          for t in (layer.in_norm, layer.post_norm))]
    linears = [model.lm_head, *(lin for layer in model.layers for lin in (layer.qkv, layer.o, *layer.mlp.linears()))]
    params = sum(t.numel() for t in tensors) + sum(lin.out_features * lin.in_features for lin in linears)
    if tiny_source.config.tie_word_embeddings:
        params -= model.embed.numel()
    estimate = weight_bytes(tiny_source.config, 4)
    assert math.isclose(estimate, params * 4, rel_tol=0.02), (estimate, params * 4)


def test_the_profiling_steps_are_the_widest_and_the_deepest_the_engine_schedules() -> None:
    cfg = engine_config(max_num_batched_tokens=2048, max_num_seqs=256, block_size=16, max_model_len=4096,
                        num_kv_blocks=8)
    wide, deep = profile_batches(cfg)
    assert len(wide) == 256 and sum(len(it.token_ids) for it in wide) == 2048
    assert all(it.sample is not None and it.sample.params.logprobs and not it.sample.params.greedy for it in wide)
    blocks = [b for it in wide for b in it.block_table]
    assert len(blocks) == len(set(blocks))  # every sequence writes blocks of its own
    (chunk,) = deep  # one chunk of the whole budget, ending at the context length
    assert (chunk.start, len(chunk.token_ids), len(chunk.block_table)) == (4096 - 2048, 2048, 256)
    one, _ = profile_batches(engine_config(max_num_batched_tokens=512, max_num_seqs=1, max_model_len=300))
    assert len(one) == 1 and len(one[0].token_ids) == 300  # never past the context length


def test_the_profiling_steps_run(tiny_source: ModelSource) -> None:
    """Each profiling step is a step the runner takes (here on the CPU, over a scratch cache)."""
    ctx = _context(tiny_source)
    cfg = engine_config(dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, block_size=8,
                        max_model_len=256, num_kv_blocks=64)
    for items in profile_batches(cfg):
        blocks = 1 + max(b for it in items for b in it.block_table)
        mc = tiny_source.config
        kv = torch.zeros(mc.num_layers, 2, mc.num_kv_heads, blocks * 8, mc.head_dim)
        out = ModelRunner(ctx.runner.model, kv, 8, ctx.runner.sampler).execute(StepBatch(items))
        assert len(out.sampled.token_ids) == len(items)


async def test_the_engine_takes_the_block_count_its_context_measured(tiny_source: ModelSource,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from test_engine_fast import engine_on, prompt

    class Measured(Context):  # stands for a CUDA Context that sized its cache from the GPU's memory
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.num_kv_blocks = 12

    monkeypatch.setattr(worker_module, "Context", Measured)
    async with engine_on(tiny_source, num_kv_blocks=64, block_size=16) as engine:
        assert engine.engine.config.num_kv_blocks == 12
        assert engine.stats()["num_kv_blocks"] == 12
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        async with trio.open_nursery() as nursery:  # more than 12 blocks' worth: preemption, not overflow
            for i in range(6):
                nursery.start_soon(engine.generate_one, prompt(i, n=30), params)
        assert engine.stats()["num_free_blocks"] == 12


# ---- the device setting --------------------------------------------------------------------
def test_the_device_setting_takes_auto_cpu_cuda_and_cuda_n() -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:1", " CUDA:0 "):
        engine_config(device=ok)
    with pytest.raises(ValueError, match="device: .*must be auto, cpu, cuda or cuda:N"):
        engine_config(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused(tiny_source: ModelSource) -> None:
    assert engine_config(dtype="float32").resolve(tiny_source.config).device == "cpu"
    with pytest.raises(ValueError, match="device 'cuda:0': torch .* sees no CUDA GPU"):
        engine_config(device="cuda:0").resolve(tiny_source.config)


def test_the_step_token_budget_defaults_by_device_and_keeps_a_set_one(tiny_source: ModelSource) -> None:
    def budget(**settings: object) -> tuple[int | None, int | None]:
        cfg = engine_config(dtype="float32", device="cpu", **settings).resolve(tiny_source.config)
        return cfg.max_num_batched_tokens, cfg.max_prefill_tokens

    # a CPU step of 1024 prompt tokens holds everyone back ~0.6 s: 256 of them, and room for
    # every running sequence's next token beside them
    assert budget() == (256 + 256, 256)
    assert budget(max_num_seqs=64) == (256 + 64, 256)
    assert budget(max_prefill_tokens=100, max_num_seqs=8) == (108, 100)
    assert budget(max_num_batched_tokens=96) == (96, 96)  # a set step budget is shared, as before
    assert budget(max_num_batched_tokens=96, max_prefill_tokens=32) == (96, 32)
    with pytest.raises(ValueError, match=r"max_prefill_tokens \(128\) exceeds max_num_batched_tokens \(96\):"):
        budget(max_num_batched_tokens=96, max_prefill_tokens=128)
    assert engine_config().max_num_batched_tokens is None  # unresolved: the device decides


def test_the_kv_block_size_defaults_by_device_and_keeps_a_set_one(tiny_source: ModelSource, monkeypatch) -> None:
    def resolved(**settings: object) -> EngineConfig:
        return engine_config(dtype="float32", device="cpu", **settings).resolve(tiny_source.config)

    # on a CPU 64 tokens: a block's rows of one head lie adjacent, and short runs of them wait on memory
    cpu = resolved()
    assert cpu.block_size == cpu.resolved_block_size() == 64
    assert resolved(block_size=16).block_size == 16
    # the default cache is 1 GiB whatever the block size: 4x the tokens per block, a quarter of the blocks
    assert resolved(block_size=16).num_kv_blocks // 4 == cpu.num_kv_blocks
    assert cpu.num_kv_blocks * cpu.kv_block_bytes(tiny_source.config) <= 1 << 30
    assert engine_config().block_size is None  # unresolved: the device decides
    monkeypatch.setattr(EngineConfig, "resolved_device", lambda self: "cuda:0")
    assert engine_config().resolved_block_size() == 16  # CUDA keeps 16
    assert engine_config(block_size=32).resolved_block_size() == 32
