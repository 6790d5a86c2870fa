"""What a Context measures on a GPU before it allocates its KV cache, and the CUDA decode op.

`measure_kv_plan` runs after the weights are on the device: one profiling step at the engine's
largest batch (max_num_batched_tokens tokens split over up to max_num_seqs sequences, each
sampled, over a scratch cache just big enough) gives the peak of the activations; with the
weights' bytes, the memory that appeared outside torch's allocator and the free memory read
before loading, `memory_plan.plan_kv_cache` sizes the cache. The scratch cache is freed before
the real one is allocated.

Invariant: runs on the device thread, before any request's step, on the Context's own device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..engine.engine_config import EngineConfig
from ..engine.memory_plan import MemoryPlan, plan_kv_cache
from ..model.attention import TableDecode, table_decode_torch
from ..model.llama import LlamaModel
from ..sampling_params import SamplingParams
from .model_runner import BatchItem, ModelRunner, StepBatch
from .sampler import Sampler, SampleRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    """The device's memory as the Context found it, before loading anything."""

    device: torch.device
    free: int
    total: int
    allocated: int  # by torch in this process (other replicas on the same GPU)
    reserved: int  # held by torch's caching allocator in this process

    @classmethod
    def read(cls, device: torch.device) -> GpuMemory:
        free, total = torch.cuda.mem_get_info(device)
        return cls(device, free, total, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def cuda_table_op() -> TableDecode:
    """Decode attention for CUDA: the Triton kernel where Triton is installed (it ships with
    CUDA builds of torch), else the plain-torch op over the whole block table."""
    from ..model.triton_attention import available, paged_decode_attention

    if available():
        return paged_decode_attention
    log.warning("Triton is not installed: CUDA decode attention runs in plain torch (slower)")
    return table_decode_torch


def profile_batch(cfg: EngineConfig) -> list[BatchItem]:
    """The largest step the engine can schedule: max_num_batched_tokens prompt tokens over
    min(max_num_seqs, tokens) sequences, each sampled, each in blocks of its own."""
    assert cfg.max_model_len is not None
    tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
    n = max(1, min(cfg.max_num_seqs, tokens))
    per = max(1, min(tokens // n, cfg.max_model_len))
    blocks = -(-per // cfg.block_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    return [BatchItem(seq_id=i, token_ids=[1] * per, start=0, block_table=list(range(i * blocks, (i + 1) * blocks)),
                      sample=SampleRow(greedy, None, None, None, 0))
            for i in range(n)]


def measure_kv_plan(model: LlamaModel, cfg: EngineConfig, before: GpuMemory, table_op: TableDecode | None,
                    sampler: Sampler) -> MemoryPlan:
    """Size the KV cache from what the weights and one profiling step take on the device."""
    dev = before.device
    torch.cuda.synchronize(dev)
    weights = torch.cuda.memory_allocated(dev) - before.allocated
    items = profile_batch(cfg)
    blocks = sum(len(it.block_table) for it in items)
    mc = model.cfg
    scratch = torch.zeros(mc.num_layers, 2, mc.num_kv_heads, blocks * cfg.block_size, mc.head_dim,
                          dtype=cfg.torch_dtype, device=dev)
    runner = ModelRunner(model, scratch, cfg.block_size, sampler, table_op=table_op)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    runner.execute(StepBatch(items))
    torch.cuda.synchronize(dev)
    activations = torch.cuda.max_memory_allocated(dev) - start
    del runner, scratch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    # memory that appeared outside torch's allocator (CUDA context, cuBLAS workspaces)
    other = max(0, (before.free - free) - (torch.cuda.memory_reserved(dev) - before.reserved))
    plan = plan_kv_cache(total=total, free_at_start=before.free, weights=weights, activations=activations,
                         other=other, utilization=cfg.gpu_memory_utilization,
                         block_bytes=cfg.kv_block_bytes(mc), block_tokens=cfg.block_size)
    log.info("%s: %s", dev, plan.describe())
    return plan
