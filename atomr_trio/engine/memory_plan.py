"""How much of a GPU's memory the KV cache gets (vLLM's `gpu_memory_utilization`).

A replica may use `utilization × total` bytes of its GPU for everything it allocates: weights,
the activations of its largest step, memory outside torch's allocator (CUDA context, cuBLAS
workspaces, graphs), and the KV cache, which gets the rest. The Context measures the first three
on the device (weights after loading, the peak of a profiling step at the largest batch) and
calls `plan_kv_cache`; before any weights exist, `provisional_blocks` estimates the same from the
model's shapes so the engine's parts can be built, and the engine takes the measured number
once its Worker has built the Context.

Invariant: a plan never gives the cache memory the GPU did not have free when the replica
started (`free_at_start`), and never fewer than one block: either is a `MemoryPlanError` that
names the numbers and the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig

if TYPE_CHECKING:
    from .engine_config import EngineConfig

GiB = 1 << 30


class MemoryPlanError(ValueError):
    """The GPU cannot hold what the settings ask for."""


@dataclass(frozen=True)
class MemoryPlan:
    total: int  # the GPU's memory
    budget: int  # utilization × total: what this replica may use
    weights: int
    activations: int  # peak of the profiling step, above the weights
    other: int  # memory outside torch's allocator that this replica added
    kv_bytes: int
    blocks: int
    block_tokens: int

    def describe(self) -> str:
        return (f"KV cache: {self.blocks} blocks, {self.blocks * self.block_tokens} tokens, "
                f"{self.kv_bytes / GiB:.2f} GiB (budget {self.budget / GiB:.2f} of {self.total / GiB:.2f} GiB; "
                f"weights {self.weights / GiB:.2f}, activations {self.activations / GiB:.2f}, "
                f"other {self.other / GiB:.2f})")


def plan_kv_cache(*, total: int, free_at_start: int, weights: int, activations: int, other: int,
                  utilization: float, block_bytes: int, block_tokens: int) -> MemoryPlan:
    """The KV cache that `utilization` of a `total`-byte GPU leaves after weights, activations
    and other memory; `free_at_start` is what was free before this replica allocated anything."""
    budget = int(total * utilization)
    if free_at_start < budget:
        raise MemoryPlanError(
            f"gpu_memory_utilization {utilization} asks for {budget / GiB:.2f} GiB of the GPU's "
            f"{total / GiB:.2f} GiB, but only {free_at_start / GiB:.2f} GiB were free when this replica "
            f"started (other processes or replicas hold the rest): lower gpu_memory_utilization")
    kv_bytes = budget - weights - activations - other
    blocks = max(kv_bytes, 0) // block_bytes
    if blocks < 1:
        raise MemoryPlanError(
            f"no room for the KV cache: gpu_memory_utilization {utilization} gives {budget / GiB:.2f} GiB, "
            f"the weights take {weights / GiB:.2f}, a step at the largest batch {activations / GiB:.2f} and "
            f"other memory {other / GiB:.2f}; one block needs {block_bytes} bytes: raise "
            f"gpu_memory_utilization or lower max_num_batched_tokens")
    return MemoryPlan(total, budget, weights, activations, other, blocks * block_bytes, blocks, block_tokens)


def weight_bytes(model: ModelConfig, itemsize: int) -> int:
    """The bytes of the model's weights in a dtype of `itemsize` bytes, from its shapes."""
    h, hd = model.hidden_size, model.head_dim
    attn = h * hd * (2 * model.num_heads + 2 * model.num_kv_heads)
    dense = 3 * h * model.intermediate_size
    moe = model.num_experts * 3 * h * model.moe_intermediate_size + model.num_experts * h
    layers = sum(attn + (moe if model.is_moe_layer(i) else dense) + 2 * h for i in range(model.num_layers))
    embed = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return (layers + embed + h) * itemsize


def activation_estimate(model: ModelConfig, tokens: int, itemsize: int) -> int:
    """A generous bound on one step's activations at `tokens` flattened tokens: a few hidden-wide
    rows, the widest MLP rows, and float32 logits for the step's sequences."""
    wide = max(model.intermediate_size, model.moe_intermediate_size * max(model.num_experts_per_tok, 1))
    rows = tokens * (8 * model.hidden_size + 3 * wide) * itemsize
    return rows + min(tokens, 256) * model.vocab_size * 4 * 2


def provisional_blocks(cfg: EngineConfig, model: ModelConfig, block_bytes: int) -> int:
    """KV blocks for a CUDA replica before anything is loaded: the plan with the weights and the
    activations estimated from the model's shapes (the Context replaces it with a measured one)."""
    assert cfg.max_num_batched_tokens is not None, "resolve sets the step token budget first"
    device = torch.device(cfg.device)
    free, total = torch.cuda.mem_get_info(device)
    itemsize = torch.empty(0, dtype=cfg.torch_dtype).element_size()
    plan = plan_kv_cache(total=total, free_at_start=free, weights=weight_bytes(model, itemsize),
                         activations=activation_estimate(model, cfg.max_num_batched_tokens, itemsize),
                         other=0, utilization=cfg.gpu_memory_utilization, block_bytes=block_bytes,
                         block_tokens=cfg.resolved_block_size())
    return plan.blocks
