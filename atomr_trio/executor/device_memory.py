"""What a Context measures on a GPU before it allocates its KV cache, and the CUDA decode op.

`measure_kv_plan` runs after the weights are on the device: the profiling steps at the engine's
extremes (`profile_batches`: the widest step, every row sampled with top-k, top-p and logprobs,
and the deepest, one chunk ending at max_model_len) give the peak of the activations, over a
scratch cache just big enough that is freed before the real one is allocated; with the bytes of
the model's tensors, the memory that appeared outside torch's allocator and the free memory read
before loading, `memory_plan.plan_kv_cache` sizes the cache.

Invariants: runs on the device thread, before any request's step, on the Context's own device;
the Contexts of replicas that share a GPU build one at a time (`build_lock`), since torch's
allocator statistics are per device. Not covered: a replica serving on the same GPU while
another one profiles adds its own activations to that peak (the plan is then conservative), and
the memory CUDA graphs take after the plan (logged by DecodeGraphs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def profile_batches(cfg: EngineConfig) -> list[list[BatchItem]]:
    """The steps whose activations bound every step the engine can schedule: the widest one
    (max_num_batched_tokens prompt tokens over min(max_num_seqs, tokens) sequences, each sampled
    with top-k, top-p and logprobs: the sampler's [rows, vocab] copies) and the deepest one (one
    chunk of max_num_batched_tokens tokens ending at max_model_len: its attention reads the whole
    context through a mask). Each sequence writes blocks of its own."""
    assert cfg.max_model_len is not None and cfg.max_num_batched_tokens is not None, "resolve cfg first"
    bs = cfg.resolved_block_size()
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20, max_tokens=1)
    tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
    n = max(1, min(cfg.max_num_seqs, tokens))
    per = max(1, min(tokens // n, cfg.max_model_len))
    blocks = -(-per // bs)
    wide = [BatchItem(seq_id=i, token_ids=[1] * per, start=0, block_table=list(range(i * blocks, (i + 1) * blocks)),
                      sample=SampleRow(sampled, None, None, None, 0))
            for i in range(n)]
    chunk = min(cfg.max_num_batched_tokens, cfg.max_model_len)
    deep = [BatchItem(seq_id=0, token_ids=[1] * chunk, start=cfg.max_model_len - chunk,
                      block_table=list(range(-(-cfg.max_model_len // bs))),
                      sample=SampleRow(sampled, None, None, None, 0))]
    return [wide, deep]


_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def build_lock(device: torch.device) -> threading.Lock:
    """One lock per GPU: the Contexts of replicas sharing a GPU measure and allocate one at a
    time (torch's allocator statistics are per device, not per replica)."""
    with _build_locks_guard:
        return _build_locks.setdefault(str(device), threading.Lock())


def measure_kv_plan(model: LlamaModel, cfg: EngineConfig, before: GpuMemory, table_op: TableDecode | None,
                    sampler: Sampler) -> MemoryPlan:
    """Size the KV cache from what the weights and the profiling steps take on the device."""
    dev = before.device
    torch.cuda.synchronize(dev)
    weights = held_bytes(model)
    mc = model.cfg
    activations = 0
    bs = cfg.resolved_block_size()
    for items in profile_batches(cfg):
        blocks = 1 + max(b for it in items for b in it.block_table)
        scratch = torch.zeros(mc.num_layers, 2, mc.num_kv_heads, blocks * bs, mc.head_dim,
                              dtype=cfg.torch_dtype, device=dev)
        runner = ModelRunner(model, scratch, bs, sampler, table_op=table_op)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        runner.execute(StepBatch(items))
        torch.cuda.synchronize(dev)
        activations = max(activations, torch.cuda.max_memory_allocated(dev) - start)
        del runner, scratch
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    # memory that appeared outside torch's allocator (CUDA context, cuBLAS workspaces)
    other = max(0, (before.free - free) - (torch.cuda.memory_reserved(dev) - before.reserved))
    plan = plan_kv_cache(total=total, free_at_start=before.free, weights=weights, activations=activations,
                         other=other, utilization=cfg.gpu_memory_utilization,
                         block_bytes=cfg.kv_block_bytes(mc), block_tokens=bs)
    log.info("%s: %s", dev, plan.describe())
    return plan


def held_bytes(*roots: Any) -> int:
    """The bytes of every tensor reachable from `roots` (a model, a cache), each storage counted
    once; an opaque tensor (oneDNN's packed weights have no storage to read) counts its elements."""
    held: dict[object, int] = {}
    for t in _tensors(list(roots), {}):
        if t.is_mkldnn or t.is_sparse:
            held[id(t)] = t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        held[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(held.values())


def _tensors(obj: Any, seen: dict[int, Any]) -> Iterator[torch.Tensor]:
    """The tensors reachable from `obj` through containers and the package's own objects
    (`seen` keeps what it visited alive, so no id is reused while walking)."""
    if id(obj) in seen:
        return
    seen[id(obj)] = obj
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        items: Any = obj.values()
    elif isinstance(obj, list | tuple | set | frozenset):
        items = obj
    elif type(obj).__module__.startswith("atomr_trio.") and hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return
    for item in items:
        yield from _tensors(item, seen)
