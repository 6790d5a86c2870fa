"""EngineConfig: the settings of one engine (one model replica), resolved against its model.

Invariant: `resolve` turns user settings into concrete numbers once (dtype, context length,
number of KV blocks); everything downstream reads the resolved values and never guesses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ..model import cpu_kernels
from ..model.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's own limit
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_bytes
    enable_prefix_caching: bool = True
    torch_threads: int | None = None  # default: all cores of this process
    seed: int = 0  # seeds this engine's own generator for unseeded sampling (the global torch RNG is untouched)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.resolved_dtype()]

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if _cpu_has_fast_bf16() else "float32"

    def resolve(self, model: ModelConfig) -> EngineConfig:
        limit = model.max_model_len
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's limit ({limit})"
            )
        max_len = self.max_model_len or limit
        itemsize = torch.empty(0, dtype=_DTYPES[self.resolved_dtype()]).element_size()
        per_block = 2 * model.num_layers * self.block_size * model.num_kv_heads * model.head_dim * itemsize
        blocks = self.num_kv_blocks or self.kv_cache_memory_bytes // per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes ({self.kv_cache_memory_bytes}) is too small for one KV "
                f"block ({per_block} bytes)"
            )
        return replace(
            self,
            dtype=self.resolved_dtype(),
            max_model_len=max_len,
            num_kv_blocks=blocks,
            torch_threads=self.torch_threads or len(os.sched_getaffinity(0)),
        )


def _cpu_has_fast_bf16() -> bool:
    """Is bfloat16 faster than float32 on this CPU? Only where a bf16 matmul path beyond plain
    torch passed its probe (cpu_kernels.py): with those, steps that are bound by reading weights
    read half the bytes. Plain torch's bf16 matmul on an AVX2-only CPU is slower than its float32
    one (measured: see `cpu_kernels.bf16_matmul_is_fast`), so such CPUs get float32."""
    return cpu_kernels.bf16_matmul_is_fast()
