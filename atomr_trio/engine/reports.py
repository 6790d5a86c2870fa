"""What an EngineCore reports about itself, and to whom: the records (frozen dataclasses) and
the two sinks it reports to. The engine knows only these protocols; the Runtime passes the
Metrics actor's and the DpCoordinator's handles as the sinks.

Invariant: a sink's method never blocks and never fails (a full inbox drops the report), so
reporting can never slow or stop the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class FinishedRequest:
    reason: str
    prompt_tokens: int
    generation_tokens: int  # all samples together
    e2e_s: float
    queue_s: float | None
    ttft_s: float | None
    prefill_s: float | None
    decode_s: float | None
    n: int = 1
    max_tokens: int | None = None  # the request's parameter
    max_generation_tokens: int = 0  # the longest sample's


@dataclass(frozen=True)
class EngineInfo:
    """Sent once by an engine when it starts: its KV cache's shape."""
    model: str
    engine: str
    block_size: int
    num_blocks: int
    prefix_caching: bool


@dataclass(frozen=True)
class StepReport:
    model: str
    engine: str
    num_running: int
    num_waiting: int
    kv_usage: float
    num_scheduled: int  # sequences in this step's batch
    iteration_tokens: int
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int  # since the previous report
    prefix_hits: int
    preemptions: int
    inter_token_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)


class ReportSink(Protocol):
    """Where step reports go (the Metrics actor)."""

    def report(self, rep: StepReport | EngineInfo) -> None: ...


class LoadSink(Protocol):
    """Where an engine's load goes after every step (its deployment's DpCoordinator)."""

    def report_load(self, engine: str, load: float) -> None: ...
