"""Deployment: one served model — its spec (pydantic, from TOML or the admin API) and the actor
that supervises its replicas (one EngineCore each).

Invariants:
- State only moves pending -> loading -> serving -> draining -> stopped, or to failed (with a
  reason).
- A deployment that fails never takes the server down: its requests get 503 with the reason,
  other deployments keep serving.
- Requests are admitted here (state, queue limit, token budget), then the DpCoordinator picks
  the least-loaded replica.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from ..engine.engine_config import EngineConfig
from ..engine.engine_core import EngineCore, EngineHandle
from ..executor.worker import Faults
from ..model_source import ModelSource
from .dp_coordinator import DpCoordinator
from .metrics import Metrics
from .placement import Placement

log = logging.getLogger(__name__)


class ServingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_queue: int = Field(default=1024, ge=0, description="most requests waiting for a batch slot")
    max_queued_prompt_tokens: int | None = Field(
        default=None, ge=1, description="most prompt tokens waiting for a batch slot (a lone prompt always may)")
    on_capacity_exhausted: Literal["reject", "queue"] = Field(
        default="reject", description="reject: 429 with Retry-After; queue: wait for a slot")


class TokenBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="prompt + completion tokens")
    on_exceeded: Literal["reject", "warn"] = Field(default="reject", description="reject: 429; warn: log and serve")


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="the name clients pass as 'model'")
    model: str | None = Field(default=None, description="HF directory or GGUF file; none: the default model")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="weights and KV cache; auto: bfloat16 where a fast bf16 path runs (--dtype)")
    replicas: int = Field(default=1, ge=1, le=64, description="data-parallel engine replicas")
    max_model_len: int | None = Field(default=None, ge=2, description="prompt + completion (default: the model's)")
    max_num_seqs: int = Field(default=256, ge=1, description="sequences per engine step, per replica")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="token budget of one step (chunked prefill)")
    kv_cache_memory_bytes: int = Field(default=1 << 30, ge=1, description="per replica")
    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV block")
    serving: ServingPolicy = Field(default_factory=ServingPolicy)
    token_budget: TokenBudget = Field(default_factory=TokenBudget)
    request_timeout: float | None = Field(
        default=None, gt=0, description="seconds a request may take, queueing included (default: the server's)")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="test hook: a device Context fails at its N-th engine step")
    fail_times: int = Field(default=1, ge=1, description="test hook: how many Contexts in a row fail")

    def engine_config(self, torch_threads: int | None, replica: int = 0) -> EngineConfig:
        """Replica i's settings. Its seed is i, so the replicas' generators for unseeded sampling
        draw different streams (with one seed, requests routed alike would get the same tokens),
        and a restarted server draws the same streams again."""
        return EngineConfig(dtype=self.dtype, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, block_size=self.block_size,
                            kv_cache_memory_bytes=self.kv_cache_memory_bytes, torch_threads=torch_threads,
                            seed=replica)


class DeploymentUnavailable(Exception):
    """The deployment cannot take this request now (not serving, or over its limits)."""

    def __init__(self, deployment: str, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.deployment, self.status, self.retry_after = deployment, status, retry_after


def _without_paths(text: str) -> str:
    """Client-facing text names no file of the server (the admin API shows the full reason)."""
    return re.sub(r"(?:[A-Za-z]:)?(?:/[\w.+-]+){2,}/?", "<path>", text)


def _first_leaf(e: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


class Ticket:
    """One admitted request's place in its deployment; release() is idempotent."""

    def __init__(self, dep: Deployment) -> None:
        self._dep: Deployment | None = dep
        dep.admitted += 1

    def release(self) -> None:
        if self._dep is not None:
            self._dep.admitted -= 1
            self._dep = None


class Deployment:
    def __init__(self, spec: DeploymentSpec, placement: Placement, metrics: Metrics | None) -> None:
        self.spec = spec
        self.placement = placement
        self.metrics = metrics
        self.state = "pending"
        self.reason: str | None = None
        self.source: ModelSource | None = None
        self.coordinator = DpCoordinator()
        self.cancel_scope = trio.CancelScope()
        self._tokens_window: list[tuple[float, int]] = []
        self.admitted = 0  # requests between route() and the release of their ticket

    @property
    def name(self) -> str:
        return self.spec.name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, serve until cancelled. Never raises for a model problem: it goes `failed`."""
        with self.cancel_scope:
            started = False
            try:
                self.state = "loading"
                threads = await self.placement.assign(self.name, self.spec.replicas)
                self.source = await trio.to_thread.run_sync(ModelSource.open, self.spec.model)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.coordinator.run)
                    for i, n_threads in enumerate(threads):
                        # off the Trio thread: `dtype=auto` may probe the CPU's bf16 kernels
                        cfg = await trio.to_thread.run_sync(self.spec.engine_config(n_threads, i).resolve,
                                                            self.source.config)
                        core = EngineCore(self.source, cfg, f"{self.name}/engine-{i}", self.name, self.metrics,
                                          load_sink=self.coordinator,
                                          faults=Faults(self.spec.fail_at_step, self.spec.fail_times))
                        self.coordinator.add(await nursery.start(core.run))
                    self.state = "serving"
                    started = True
                    task_status.started()
                    log.info("deployment %s: serving %d replica(s)", self.name, len(self.replicas))
            except Exception as e:  # noqa: BLE001 - a model or engine failure ends this deployment only
                cause = _first_leaf(e)
                self.state, self.reason = "failed", f"{type(cause).__name__}: {cause}"
                log.error("deployment %s failed: %s", self.name, self.reason, exc_info=cause)
            finally:
                self.placement.release(self.name)
                if self.state != "failed":
                    self.state = "stopped"
                if not started:
                    task_status.started()

    async def route(self) -> tuple[EngineHandle, ModelSource, Ticket]:
        """Admit one request and have the DpCoordinator pick its replica (its engine, and the
        model it serves), or raise DeploymentUnavailable. The caller releases the ticket when the
        request is over."""
        if self.state != "serving" or self.source is None:
            if self.state == "failed" or any(c.snapshot().failure for c in self.replicas):
                self.state = "failed"
            why = f": {_without_paths(self.reason)}" if self.reason else ""
            raise DeploymentUnavailable(self.name, 503, f"deployment '{self.name}' is {self.state}{why}")
        serving = self.coordinator.serving()
        capacity = self.spec.max_num_seqs * len(serving) + self.spec.serving.max_queue
        if self.spec.serving.on_capacity_exhausted == "reject" and self.admitted >= capacity:
            raise DeploymentUnavailable(
                self.name, 429, f"deployment '{self.name}' is at capacity ({self.admitted} requests in flight)", 1.0)
        core = await self.coordinator.pick()
        if core is None:
            raise DeploymentUnavailable(self.name, 503, f"deployment '{self.name}' has no serving replica")
        return core, self.source, Ticket(self)

    def admit(self, jobs: list[tuple[int, int, int | None]]) -> None:
        """Check the (prompt tokens, n, max_tokens) of a request's prompts against the waiting-
        prompt-token limit, then charge them to the per-minute token budget; 429 past either."""
        self._check_queued_prompts(sum(p * n for p, n, _ in jobs))
        self._charge(sum(p + (m or 0) * n for p, n, m in jobs))

    def _check_queued_prompts(self, prompt_tokens: int) -> None:
        policy = self.spec.serving
        limit = policy.max_queued_prompt_tokens
        if limit is None or policy.on_capacity_exhausted != "reject":
            return
        queued = sum(c.snapshot().waiting_prompt_tokens for c in self.replicas)
        if queued and queued + prompt_tokens > limit:
            raise DeploymentUnavailable(
                self.name, 429, f"deployment '{self.name}' has {queued} prompt tokens waiting (limit {limit})", 1.0)

    def _charge(self, tokens: int) -> None:
        budget = self.spec.token_budget
        if budget.tokens_per_minute is None:
            return
        now = time.monotonic()
        self._tokens_window = [(t, n) for t, n in self._tokens_window if now - t < 60.0]
        used = sum(n for _, n in self._tokens_window)
        if used + tokens > budget.tokens_per_minute:
            if budget.on_exceeded == "reject":
                wait = 60.0 - (now - self._tokens_window[0][0]) if self._tokens_window else 60.0
                raise DeploymentUnavailable(
                    self.name, 429, f"deployment '{self.name}' token budget ({budget.tokens_per_minute}/min) exceeded",
                    max(1.0, wait))
            log.warning("deployment %s: token budget exceeded (%d/min)", self.name, budget.tokens_per_minute)
        self._tokens_window.append((now, tokens))

    @property
    def replicas(self) -> list[EngineHandle]:
        return self.coordinator.replicas

    def in_flight(self) -> int:
        return sum(s.num_requests_running + s.num_requests_waiting for s in (c.snapshot() for c in self.replicas))

    def describe(self) -> dict:
        return {
            "name": self.name, "state": self.state, "reason": self.reason,
            "model": self.spec.model or "default", "replicas": [c.snapshot().as_dict() for c in self.replicas],
            "spec": self.spec.model_dump(),
        }
