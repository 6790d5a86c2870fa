"""DeploymentSpec: what one served model is (pydantic; from TOML, the admin API or CLI flags).

Invariant: a deployment's engine settings are `EngineSettings` fields (inherited, so their
defaults and bounds live once, in engine/engine_config.py); this module adds only what belongs
to a deployment (name, model, replicas, admission policy, token budget, timeout, test hooks).
Specs are frozen: a running deployment's spec never changes under it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.engine_config import EngineConfig, EngineSettings


class ServingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_queue: int = Field(default=1024, ge=0, description="most requests waiting for a batch slot")
    max_queued_prompt_tokens: int | None = Field(
        default=None, ge=1, description="most prompt tokens waiting for a batch slot (a lone prompt always may)")
    on_capacity_exhausted: Literal["reject", "queue"] = Field(
        default="reject", description="reject: 429 with Retry-After; queue: wait for a slot")


class TokenBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tokens_per_minute: int | None = Field(default=None, ge=1, description="prompt + completion tokens")
    on_exceeded: Literal["reject", "warn"] = Field(default="reject", description="reject: 429; warn: log and serve")


class DeploymentSpec(EngineSettings):
    name: str = Field(min_length=1, max_length=200, description="the name clients pass as 'model'")
    model: str | None = Field(
        default=None, description="HF model directory or GGUF file (default: the built-in SmolLM2-135M)")
    replicas: int = Field(default=1, ge=1, le=64,
                          description="data-parallel engine replicas of the model; on CPU the cores are split "
                                      "between them, on CUDA each gets its own GPU (two share one only when "
                                      "replicas outnumber GPUs)")
    serving: ServingPolicy = Field(default_factory=ServingPolicy)
    token_budget: TokenBudget = Field(default_factory=TokenBudget)
    request_timeout: float | None = Field(
        default=None, gt=0, description="seconds a request may take, queueing included (default: the server's)")
    enable_auto_tool_choice: bool = Field(
        default=False, description="let the model decide whether to call tools (tool_choice 'auto', the default "
                                   "when a chat request has tools); without it 'auto' is refused")
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] = Field(
        default="hermes", description="how tool calls are read from the model's text under tool_choice 'auto'")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="test hook: a device Context fails at its N-th engine step")
    fail_times: int = Field(default=1, ge=1, description="test hook: how many Contexts in a row fail")
    fail_kind: Literal["fault", "oom"] = Field(
        default="fault", description="test hook: fault breaks the Context (a sticky device error); oom makes "
                                     "fail_times steps from the N-th raise out of memory, the Context intact")

    def engine_config(self, torch_threads: int | None, replica: int = 0, device: str | None = None) -> EngineConfig:
        """Replica i's settings. Its seed is i, so the replicas' generators for unseeded sampling
        draw different streams (with one seed, requests routed alike would get the same tokens),
        and a restarted server draws the same streams again. `device`: the one placement
        assigned ("cpu", "cuda:i"), instead of the spec's."""
        engine = self.model_dump(include=set(EngineSettings.model_fields))
        if device is not None:
            engine["device"] = device
        return EngineConfig(**engine, torch_threads=torch_threads, seed=replica)
