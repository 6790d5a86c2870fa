"""Context: the restartable tier of a device — weights and KV cache, and the one step they run.

Invariant: a Context holds everything a device failure can poison, and nothing else, so a
broken one is dropped and rebuilt from the model source; it is built and used only on its
Worker's DeviceThread. A Context that failed stays failed (like a GPU after a sticky error).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import torch

from ..engine.engine_config import EngineConfig
from ..engine.memory_plan import MemoryPlan
from ..model import cpu_kernels
from ..model.families import build_model
from ..model_source import ModelSource
from .cuda_graphs import DecodeGraphs, capture_sizes
from .device_memory import GpuMemory, build_lock, cuda_table_op, measure_kv_plan
from .model_runner import ModelRunner, StepBatch, StepResult
from .sampler import Sampler


class InjectedFault(RuntimeError):
    """Raised by a Context at the step chosen by the `fail_at_step` test hook; it stands for a
    device failure, so the Context stays broken afterwards (like a GPU after a sticky error)."""


class Context:
    """Weights + KV cache on one device. Built and used only on the device thread."""

    def __init__(self, source: ModelSource, cfg: EngineConfig, fail_at_step: int | None = None) -> None:
        assert cfg.max_model_len is not None and cfg.num_kv_blocks is not None
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.broken = False
        device = torch.device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            with build_lock(device):  # replicas sharing the GPU measure and allocate one at a time
                self._build(source, cfg, device)
        else:
            self._build(source, cfg, device)

    def _build(self, source: ModelSource, cfg: EngineConfig, device: torch.device) -> None:
        assert cfg.max_model_len is not None and cfg.num_kv_blocks is not None
        cuda = device.type == "cuda"
        gpu = GpuMemory.read(device) if cuda else None
        rng = torch.Generator(device=cfg.device).manual_seed(cfg.seed)  # this engine's own, for unseeded rows
        mc = source.config
        model = build_model(mc, cfg.torch_dtype, cfg.max_model_len, cfg.device)
        model.load_weights(source.weights(cfg.quantization), source.path)
        self.plan: cpu_kernels.KernelPlan | None = None
        if not cuda:
            self.plan = cpu_kernels.choose(mc, cfg.torch_dtype)  # each fast path probed before use
            model.use_kernels(self.plan, int8=cfg.quantization == "int8")
            return_freed_heap()
        table_op = cuda_table_op() if cuda else None
        draws = self.plan.kernels.sample_rows if self.plan and self.plan.sampling and self.plan.kernels else None
        sampler = Sampler(source.eos_token_ids, rng, draws)
        self.memory: MemoryPlan | None = None
        blocks = cfg.num_kv_blocks
        if gpu is not None and cfg.kv_from_gpu_memory:
            self.memory = measure_kv_plan(model, cfg, gpu, table_op, sampler)
            blocks = self.memory.blocks
        self.num_kv_blocks = blocks
        scratch = 1 if cuda else 0  # one block more on CUDA: the padding rows of graph replays write there
        bs = cfg.resolved_block_size()
        kv = torch.empty(
            mc.num_layers, 2, mc.num_kv_heads, (blocks + scratch) * bs, mc.head_dim,
            dtype=cfg.torch_dtype, device=cfg.device,
        )
        advise_huge_pages(kv)  # (CPU only) before the zeros below first touch its pages
        kv.zero_()
        self.runner = ModelRunner(model, kv, bs, sampler, table_op=table_op)
        if cuda and table_op is not None and not cfg.enforce_eager and model.graph_safe:
            graphs = DecodeGraphs(model, kv, bs, table_op, capture_sizes(cfg.max_num_seqs),
                                  -(-cfg.max_model_len // bs), blocks * bs, cuda=True)
            graphs.capture()
            self.runner.graphs = graphs

    @property
    def kernels(self) -> str:
        """Which kernel path each part of the forward runs on (cpu_kernels.py), for the views."""
        if self.plan is not None:
            isa = self.runner.model.int8_isa
            if isa:
                return f"matmul=int8 ({isa}), ops={self.plan.ops}"
            return self.plan.summary()
        runner = self.runner
        attention = getattr(runner.table_op, "__module__", "torch").rsplit(".", 1)[-1]
        graphs = f"graphs {runner.graphs.sizes[0]}-{runner.graphs.sizes[-1]}" if runner.graphs else "eager"
        return f"{runner.device.type}: decode attention {attention}, {graphs}"

    def execute(self, batch: StepBatch, on_launch: Callable[[], None] | None = None) -> StepResult:
        self.steps += 1
        if self.steps == self.fail_at_step:
            self.broken = True
        if self.broken:
            raise InjectedFault(f"injected fault at step {self.fail_at_step}")
        return self.runner.execute(batch, on_launch)

    def healthy(self) -> bool:
        """Can this Context still compute? A read that synchronizes with the device surfaces an
        asynchronous device error (on CUDA) as an exception here."""
        if self.broken:
            return False
        probe = torch.ones(2, device=self.runner.kv_cache.device)
        return float(probe.sum().item()) == 2.0


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a CPU tensor's memory with transparent huge pages (2 MiB) where the
    system allows them on request (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`,
    the common default; with `always` they come anyway, with `never` not at all). Called on the
    KV cache before its pages are first touched. Why: a decode step reads every sequence's
    context through its block table, 2 KiB of keys (or values) per block and head for the default
    model, so nearly every block read lands on a page whose address translation is not cached;
    with 2 MiB pages a few hundred entries cover the whole cache. Measured on a 2-core AMD EPYC
    with AVX512-BF16 (Zen 5), the default model's decode attention over 30 layers' caches, 64
    sequences x 233 positions, blocks scattered, 3 alternated runs: 12.8-14.7 -> 10.1-10.4 ms;
    a whole decode step of 64 sequences (context ~183, blocks scattered) 37.1-37.9 -> 35.8-36.2 ms
    mean; on a 2-core Zen 2 (AVX2) ~0.7% faster. (The matmul weights are streamed in order and
    measured level with huge pages.) Returns whether the advice was accepted, not whether huge
    pages came: memory the process had touched before (a small tensor taken from glibc's heap)
    keeps its pages; the cache of a real model is a fresh mapping. False where there is no such
    call (not Linux) or it is refused."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or t.device.type != "cpu" or t.numel() == 0:
        return False
    madvise = _libc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if madvise is None:
        return False
    storage = t.untyped_storage()  # all of the tensor's memory, whatever its strides
    start = storage.data_ptr()
    aligned = start - start % mmap.PAGESIZE  # whole pages (advice only: a shared first page is harmless)
    return madvise(aligned, start + storage.nbytes() - aligned, advice) == 0


def return_freed_heap() -> None:
    """Give the heap memory freed while loading back to the OS (glibc's `malloc_trim`). Loading
    passes every weight through float copies on the way to its final layout (dequantized GGUF
    blocks, bf16 panels, int8 packing), and glibc keeps what those freed in its arenas. Measured
    on the default model right after loading: bf16 833 -> 721 MiB resident, int8 815 -> 595 MiB.
    Elsewhere (not glibc) nothing happens."""
    trim = _libc("malloc_trim", [ctypes.c_size_t])
    if trim is not None:
        trim(0)


def _libc(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """The C library's function `name` (returning an int), or None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):  # no C library by that call (Windows) or no such function
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn
