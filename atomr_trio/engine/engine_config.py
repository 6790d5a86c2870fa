"""The settings of one engine (one model replica): what a user sets, and what the engine reads.

Invariants:
- Every engine setting, its default, its bounds and its meaning are written once, as a field of
  `EngineSettings` (the settings the CLI, TOML deployments and the library share) or
  `EngineOptions` (the few more only the library sets). The CLI parser, the deployment spec and
  docs/configuration.md are generated from these models; nothing repeats a default.
- `EngineConfig` is the frozen record the engine reads. `resolve` turns it into concrete numbers
  once (dtype, context length, number of KV blocks, threads); everything downstream reads the
  resolved values and never guesses.
- float16 is refused everywhere (the CPU kernels compute in float32 or bfloat16).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..model import cpu_kernels
from ..model.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Dtype = Literal["auto", "float32", "bfloat16"]


class EngineSettings(BaseModel):
    """The engine settings of a deployment (TOML, admin API, CLI flags) and of the library."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dtype: Dtype = Field(
        default="auto", description="weight and KV dtype; auto: bfloat16 on CUDA and on CPUs where a bf16 matmul "
                                    "path beyond plain torch passes its probe, else float32")
    max_model_len: int | None = Field(
        default=None, ge=2, description="longest prompt + completion (default: the model's)")
    max_num_seqs: int = Field(default=256, ge=1, description="most sequences in one engine step, per replica")
    max_num_batched_tokens: int = Field(
        default=2048, ge=1, description="token budget of one engine step; longer prompts are chunked")
    kv_cache_memory_bytes: int = Field(
        default=1 << 30, ge=1, description="memory for the paged KV cache in bytes, per replica")
    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV block")

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("float16", "half", "fp16"):
            raise ValueError("float16 is not supported (the CPU kernels compute in float32 or bfloat16): "
                             "use bfloat16 or float32")
        return value


class EngineOptions(EngineSettings):
    """EngineSettings and the knobs only the library sets: in a deployment, the placement
    chooses the threads and the replica index is the seed."""

    device: str = Field(default="cpu", description="torch device of the weights and KV cache")
    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="number of KV blocks; overrides kv_cache_memory_bytes")
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV blocks of shared prompt prefixes")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads (default: all of this process)")
    seed: int = Field(default=0, description="seeds this engine's own generator for unseeded sampling "
                                             "(the global torch RNG is untouched)")


class EngineConfig(EngineOptions):
    """The frozen settings an engine runs with; `resolve` fills in the model-dependent ones."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.resolved_dtype()]

    def resolved_dtype(self) -> Literal["float32", "bfloat16"]:
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
        return self.model_copy(update={
            "dtype": self.resolved_dtype(),
            "max_model_len": max_len,
            "num_kv_blocks": blocks,
            "torch_threads": self.torch_threads or len(os.sched_getaffinity(0)),
        })


def engine_config(config: EngineConfig | None = None, **settings: Any) -> EngineConfig:
    """`config` (default: all defaults) with `settings` applied, validated by the model. An unknown
    name is a TypeError, as for any keyword argument; a bad value a ValueError naming the setting."""
    unknown = set(settings) - set(EngineConfig.model_fields)
    if unknown:
        raise TypeError(f"unknown engine setting(s): {', '.join(sorted(unknown))}")
    base = config.model_dump() if config is not None else {}
    try:
        return EngineConfig.model_validate({**base, **settings})
    except ValidationError as e:
        raise ValueError(validation_message(e)) from None


def validation_message(e: ValidationError, names: dict[str, str] | None = None) -> str:
    """One line per invalid field, `name: why (got value)`; `names` renames fields (to flags)."""
    lines = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"]))
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{(names or {}).get(loc, loc)}: {err['msg']}{got}")
    return "; ".join(lines)


def _cpu_has_fast_bf16() -> bool:
    """Is bfloat16 faster than float32 on this CPU? Only where a bf16 matmul path beyond plain
    torch passed its probe (cpu_kernels.py): with those, steps that are bound by reading weights
    read half the bytes. Plain torch's bf16 matmul on an AVX2-only CPU is slower than its float32
    one (measured: see `cpu_kernels.bf16_matmul_is_fast`), so such CPUs get float32."""
    return cpu_kernels.bf16_matmul_is_fast()
