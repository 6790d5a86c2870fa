"""The settings of one engine (one model replica): what a user sets, and what the engine reads.

Invariants:
- Every engine setting, its default, its bounds and its meaning are written once, as a field of
  `EngineSettings` (the settings the CLI, TOML deployments and the library share) or
  `EngineOptions` (the few more only the library sets). The CLI parser, the deployment spec and
  docs/configuration.md are generated from these models; nothing repeats a default.
- `EngineConfig` is the frozen record the engine reads. `resolve` turns it into concrete numbers
  once (dtype, context length, step token budget, number of KV blocks, threads); everything
  downstream reads the resolved values and never guesses.
- float16 is refused everywhere (the CPU kernels compute in float32 or bfloat16).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..model import cpu_kernels
from ..model.config import ModelConfig
from . import memory_plan

DEFAULT_CPU_KV_BYTES = 1 << 30
# The prompt tokens of a step on a CPU (max_prefill_tokens). A prompt token
# costs about the same in steps of 256 as of 1024 (the matmuls are compute-bound from a few
# hundred rows), while every running sequence's next token and every waiting prompt's first
# wait for the whole step. Served on the default model (2-core Zen 4, bf16, 128 in / 128 out,
# 2 alternated runs each), 256 against 1024:
# TTFT median at 16 concurrent 717-818 -> 521-535 ms, at 64 1828-1975 -> 1251-1320 ms; output
# tok/s level (16: 485-510 vs 491-520; 64: 569-586 vs 583-594); a lone 1900-token prompt's TTFT
# 2-4% longer (8 steps instead of 2). Built for AVX2 (haswell) a prompt token costs ~4% more in
# 256-token steps (prefill 806-836 vs 838-868 tok/s: each step widens the weight once). GGUF
# weights (--quantization gguf, the default model's Q4_1), 2 alternated runs: TTFT median at 16
# concurrent 787-1042 -> 610-668 ms, at 64 1925-1957 -> 1233-2116; output tok/s 359-387 vs
# 368-373 and 517-547 vs 529-550. (Where GGUF prefill still dequantizes whole matrices — float32
# activations, or no native bf16 matmul: quantized.py — each step pays that once, 4 times as
# often as in steps of 1024.)
# On a CPU those 256 are the prompt tokens of a step (max_prefill_tokens), and the step's budget
# has room for every running sequence's next token beside them (max_prefill_tokens +
# max_num_seqs): when decodes shared the 256, 64 of them left the prompt chunks 192, and waiting
# prompts queued longer exactly under load. Served on the default model (2-core AMD EPYC Zen 2,
# AVX2, bf16, 128 in / 128 out, 2 alternated rounds), against decodes sharing the 256: TTFT
# median at 16 concurrent 1211-1226 -> 1065-1070 ms, at 64 2640-2652 -> 1369-1396 ms (mean
# 4373-4400 -> 3804-3820, p99 12.95-13.04 -> 12.42-12.43 s); output tok/s level (16: 260-264 vs
# 262-263; 64: 286-288 vs 288-290).
DEFAULT_CPU_PREFILL_TOKENS = 256
DEFAULT_CUDA_STEP_TOKENS = 2048  # every token of a step on CUDA (max_num_batched_tokens)
# Tokens per KV block on a CPU. Decode attention reads each sequence's keys and values through
# its block table: a block's rows of one KV head (K or V) lie adjacent, block_size of them, while
# the blocks of a sequence lie wherever the free queue had them; at 16 tokens (2 KiB runs for the
# default model) the reads are short and scattered and the step waits on memory. Measured on the
# default model (2-core AMD EPYC Zen 5, bf16): decode steps of 64 sequences (context ~250) whose
# block tables come from simulating the served 1 GiB cache (LRU free queue, 128-token prompts,
# 128 tokens out), 2 alternated rounds: 16 tokens 32.8 / 33.6 ms, 32 31.0 / 29.6, 64 29.4 / 28.9,
# 128 30.7 / 31.0; the AVX2 kernels (built for Haswell, same machine) 16 tokens 87.2 / 83.1 ms,
# 64 83.7 / 80.7; served 64 concurrent (128 in / 128 out, 3 alternated rounds) 1150-1200 ->
# 1175-1194 tok/s (128: 1156-1263), 16 concurrent 1011-1032 -> 1012-1051. 64 rather than vLLM
# CPU's 128: a block is also the unit of prefix reuse and of the space a sequence holds beyond
# its tokens.
DEFAULT_CPU_BLOCK_SIZE = 64
DEFAULT_CUDA_BLOCK_SIZE = 16
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
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, description="most tokens one engine step computes, prompt chunks and decodes alike "
                                        "(default: on CPU max_prefill_tokens + max_num_seqs, so decoding sequences "
                                        "never crowd prompt chunks out; 2048 on CUDA)")
    max_prefill_tokens: int | None = Field(
        default=None, ge=1, description="most prompt tokens one engine step computes; longer prompts are chunked "
                                        "(default: 256 on CPU, where a prompt token costs a good part of a "
                                        "millisecond and a smaller step lets running sequences decode and waiting "
                                        "prompts start between chunks; else max_num_batched_tokens)")
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1, description="memory for the paged KV cache in bytes, per replica (default: 1 GiB on "
                                       "CPU; on CUDA what gpu_memory_utilization leaves)")
    block_size: int | None = Field(
        default=None, ge=1, le=1024, description="tokens per KV block, the unit of cache allocation and prefix "
                                                 "reuse (default: 64 on CPU, where decode attention then finds "
                                                 "longer runs of a context's rows adjacent in memory; 16 on CUDA)")
    device: str = Field(
        default="auto", description="where the weights, KV cache and steps live: auto (cuda when torch sees a GPU, "
                                    "else cpu), cpu, cuda or cuda:N; a deployment's replicas on cuda are "
                                    "spread over the GPUs by free memory")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="CUDA: the share of the GPU's memory this replica may use for "
                                            "weights, activations and KV cache; the KV cache gets what the weights "
                                            "and a profiling step at the largest batch leave")
    async_scheduling: bool = Field(
        default=True, description="schedule each step while the one before it runs (its sampled tokens are "
                                  "filled in on the device thread), so scheduling, results and streaming "
                                  "overlap the forward; steps of requests with a grammar or prompt logprobs "
                                  "still wait for the step before them")
    enforce_eager: bool = Field(
        default=False, description="CUDA: run every step eagerly (no CUDA graphs for decode steps)")
    quantization: Literal["none", "gguf", "int8"] = Field(
        default="none", description="none: every weight is dequantized to dtype on loading; gguf: a GGUF "
                                    "model's Q8_0, Q4_0, Q4_1 and Q4_K matrices stay in their blocks in memory "
                                    "and a native CPU kernel multiplies by them (activations in dtype, float32 "
                                    "sums; needs the native kernels; not on CUDA nor for HF checkpoints); "
                                    "int8: every weight matrix is quantized to int8 per output channel on "
                                    "loading and activations per row and group of 64 inputs at each matmul "
                                    "(W8A8, exact int32 sums; lossy; fast on CPUs with AVX512-VNNI or AVX2; needs the "
                                    "native kernels; not on CUDA)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

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

    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="number of KV blocks, of block_size tokens each; overrides "
                                        "kv_cache_memory_bytes")
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV blocks of shared prompt prefixes")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads (default: all of this process)")
    seed: int = Field(default=0, description="seeds this engine's own generator for unseeded sampling "
                                             "(the global torch RNG is untouched)")


class EngineConfig(EngineOptions):
    """The frozen settings an engine runs with; `resolve` fills in the model-dependent ones."""

    kv_from_gpu_memory: bool = Field(
        default=False, description="set by resolve: num_kv_blocks is provisional, the Context sizes the cache "
                                   "from the GPU's memory (memory_plan.py)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.resolved_dtype()]

    def resolved_dtype(self) -> Literal["float32", "bfloat16"]:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device().startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if _cpu_has_fast_bf16() else "float32"

    def resolved_block_size(self) -> int:
        """`block_size`, or where unset the default of the device it resolves to."""
        if self.block_size is not None:
            return self.block_size
        return DEFAULT_CUDA_BLOCK_SIZE if self.resolved_device().startswith("cuda") else DEFAULT_CPU_BLOCK_SIZE

    def resolved_device(self) -> str:
        """`device` as a concrete torch device: auto is cuda:0 where torch sees a GPU, else cpu;
        plain cuda is the current GPU. Asking for a GPU torch cannot see is a ValueError."""
        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return "cpu"
        if not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: torch {torch.__version__} sees no CUDA GPU "
                             f"(built with CUDA: {torch.version.cuda or 'no'})")
        if self.device in ("auto", "cuda"):
            return f"cuda:{torch.cuda.current_device()}"
        index = int(self.device.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: torch sees {torch.cuda.device_count()} GPU(s)")
        return self.device

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def kv_block_bytes(self, model: ModelConfig) -> int:
        itemsize = torch.empty(0, dtype=_DTYPES[self.resolved_dtype()]).element_size()
        return 2 * model.num_layers * self.resolved_block_size() * model.num_kv_heads * model.head_dim * itemsize

    def step_budget(self, device: str) -> tuple[int, int]:
        """(max_num_batched_tokens, max_prefill_tokens) on `device`, defaults filled in."""
        kind = device.split(":")[0]
        if self.max_num_batched_tokens is None and kind == "cpu":
            prefill = self.max_prefill_tokens or DEFAULT_CPU_PREFILL_TOKENS
            return prefill + self.max_num_seqs, prefill
        step = self.max_num_batched_tokens or DEFAULT_CUDA_STEP_TOKENS  # (set by the user, or CUDA's)
        prefill = self.max_prefill_tokens or step
        if prefill > step:
            which = "" if self.max_num_batched_tokens else f", the default on {kind}"
            raise ValueError(f"max_prefill_tokens ({prefill}) exceeds max_num_batched_tokens ({step}{which}): a "
                             "step cannot hold its prompt chunks")
        return step, prefill

    def resolve(self, model: ModelConfig) -> EngineConfig:
        """Concrete numbers: dtype, device, context length, step token budget, threads and KV blocks. On CUDA without
        num_kv_blocks or kv_cache_memory_bytes, the blocks here are provisional (what the GPU's
        memory leaves after the weights, before any step): the Context measures the weights and a
        profiling step on the device and sizes the cache from that (memory_plan.py)."""
        limit = model.max_model_len
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's limit ({limit})"
            )
        device = self.resolved_device()
        if self.quantization != "none" and device != "cpu":
            raise ValueError(f"quantization {self.quantization!r} runs on the CPU only for now (device {device!r}); "
                             "use quantization='none' on a GPU")
        step_tokens, prefill_tokens = self.step_budget(device)
        resolved = self.model_copy(update={"device": device, "max_num_batched_tokens": step_tokens,
                                           "max_prefill_tokens": prefill_tokens,
                                           "block_size": self.resolved_block_size()})
        per_block = resolved.kv_block_bytes(model)
        if self.num_kv_blocks:
            blocks = self.num_kv_blocks
        elif self.kv_cache_memory_bytes is not None or not resolved.on_cuda:
            memory = self.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
            blocks = memory // per_block
            if blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes ({memory}) is too small for one KV block ({per_block} bytes)")
        else:
            blocks = memory_plan.provisional_blocks(resolved, model, per_block)
        return resolved.model_copy(update={
            "kv_from_gpu_memory": resolved.on_cuda and not self.num_kv_blocks and self.kv_cache_memory_bytes is None,
            "dtype": self.resolved_dtype(),
            "max_model_len": self.max_model_len or limit,
            "num_kv_blocks": blocks,
            "torch_threads": self.torch_threads or len(os.sched_getaffinity(0)),
        })


def engine_config(config: EngineConfig | None = None, **settings: Any) -> EngineConfig:
    """`config` (default: all defaults) with `settings` applied, validated by the model. An unknown
    name is a TypeError, as for any keyword argument; a bad value a ValueError naming the setting."""
    unknown = set(settings) - set(EngineOptions.model_fields)
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
    read half the bytes. Where that path is the AVX2 or NEON native matmul, it is timed against float32
    once per process and must be the faster. Plain torch's bf16 matmul on an AVX2-only CPU is
    slower than its float32 one (measured: see `cpu_kernels.bf16_matmul_is_fast`), so a CPU with
    nothing beyond it gets float32."""
    return cpu_kernels.bf16_matmul_is_fast()
