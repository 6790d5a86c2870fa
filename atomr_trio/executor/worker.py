"""Worker (stable) and Context (restartable): the two tiers that own one device.

Invariants:
- The Worker lives as long as its EngineCore and is what the engine talks to; the Context holds
  everything that a device failure can poison (weights, KV tensors) and can be rebuilt from the
  model source without the engine noticing anything but lost KV contents.
- All torch work of a device runs on the Worker's DeviceThread, one job at a time.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..engine.engine_config import EngineConfig
from ..model import cpu_kernels
from ..model.llama import LlamaModel
from ..model_source import ModelSource
from .device_thread import DeviceThread
from .model_runner import ModelRunner, StepBatch, StepResult
from .sampler import Sampler

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # Context rebuilds allowed ...
RESTART_WINDOW_S = 60.0  # ... within this many seconds


@dataclass(frozen=True)
class Faults:
    """Test hook: each of the first `times` Contexts fails at its `at_step`-th step."""

    at_step: int | None = None
    times: int = 1


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the Worker shows of itself to the views (/admin/tree)."""

    name: str
    device: str
    state: str  # "starting" | "ready" | "rebuilding" | "stopped"
    context_builds: int
    inbox_depth: int
    kernels: str  # which kernel path each part of the forward runs on (cpu_kernels.py)


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
        rng = torch.Generator(device=cfg.device).manual_seed(cfg.seed)  # this engine's own, for unseeded rows
        mc = source.config
        model = LlamaModel(mc, cfg.torch_dtype, cfg.max_model_len)
        model.load_weights(source.weights(), source.path)
        self.plan: cpu_kernels.KernelPlan | None = None
        if torch.device(cfg.device).type == "cpu":
            self.plan = cpu_kernels.choose(mc, cfg.torch_dtype)  # each fast path probed before use
            log.info("%s", self.plan.describe())
            model.use_kernels(self.plan)
        kv = torch.zeros(
            mc.num_layers, 2, mc.num_kv_heads, cfg.num_kv_blocks * cfg.block_size, mc.head_dim,
            dtype=cfg.torch_dtype, device=cfg.device,
        )
        self.runner = ModelRunner(model, kv, cfg.block_size, Sampler(source.eos_token_ids, rng))

    def execute(self, batch: StepBatch) -> StepResult:
        self.steps += 1
        if self.steps == self.fail_at_step:
            self.broken = True
        if self.broken:
            raise InjectedFault(f"injected fault at step {self.fail_at_step}")
        return self.runner.execute(batch)

    def healthy(self) -> bool:
        """Can this Context still compute? A read that synchronizes with the device surfaces an
        asynchronous device error (on CUDA) as an exception here."""
        if self.broken:
            return False
        probe = torch.ones(2, device=self.runner.kv_cache.device)
        return float(probe.sum().item()) == 2.0


class Worker:
    def __init__(self, source: ModelSource, cfg: EngineConfig, name: str, faults: Faults | None = None) -> None:
        self.source = source
        self.cfg = cfg
        self.name = name
        self.thread = DeviceThread(f"{name}-device", cfg.torch_threads)
        self.context: Context | None = None
        self.state = "starting"
        self.num_context_builds = 0
        self.faults = faults or Faults()
        self._restarts: deque[float] = deque()

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(self.name, self.cfg.device, self.state, self.num_context_builds, 0, self.kernels)

    def can_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        return len(self._restarts) < MAX_RESTARTS

    async def restart(self) -> None:
        """Rebuild a failed Context (the caller checked `can_restart`)."""
        self._restarts.append(time.monotonic())
        await self.rebuild()

    async def start(self) -> None:
        await self.rebuild()

    async def rebuild(self) -> None:
        """(Re)create the Context on the device thread; the old one is dropped first."""

        inject = self.faults.at_step if self.num_context_builds < self.faults.times else None

        def build() -> Context:
            self.context = None
            gc.collect()
            return Context(self.source, self.cfg, inject)

        self.state = "rebuilding" if self.num_context_builds else "starting"
        self.context = await self.thread.run(build)
        self.state = "ready"
        self.num_context_builds += 1
        log.info("%s: context ready (build %d)", self.name, self.num_context_builds)

    @property
    def kernels(self) -> str:
        """Which kernel path each part of the forward runs on (cpu_kernels.py), for the views."""
        ctx = self.context
        return ctx.plan.summary() if ctx is not None and ctx.plan is not None else "torch"

    async def execute(self, batch: StepBatch) -> StepResult:
        ctx = self.context
        if ctx is None:
            raise RuntimeError(f"{self.name}: no device context")
        return await self.thread.run(lambda: ctx.execute(batch))

    async def healthy(self) -> bool:
        """After a failed step: False when the Context itself is at fault (rebuild it), True when
        the failure must have come from the batch's contents."""
        ctx = self.context
        if ctx is None:
            return False
        try:
            return await self.thread.run(ctx.healthy)
        except Exception:  # noqa: BLE001 - any error here means the device context is gone
            return False

    def close(self) -> None:
        """Drop the Context and end the device thread (no job is in flight: `run` never
        abandons one, so the engine only gets here between steps)."""
        self.context = None
        self.state = "stopped"
        self.thread.stop()
        self.thread.join(timeout=30)
