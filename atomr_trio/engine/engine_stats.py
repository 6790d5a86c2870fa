"""An engine's counters (`EngineStats`) and the `StepReporter` that turns them into the reports
its sinks receive.

Invariants: counters only grow. A StepReport carries what happened since the previous report
(the reporter keeps the last cumulative values it sent and sends differences), so each prefix
query, hit, preemption, inter-token gap and finished request is reported exactly once. Reporting
never blocks: the sinks drop what they cannot take (reports.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager
from .reports import EngineInfo, FinishedRequest, LoadSink, ReportSink, StepReport
from .scheduler import Scheduler


@dataclass
class EngineStats:
    steps: int = 0
    multi_seq_steps: int = 0  # steps whose batch carried more than one sequence
    prompt_tokens: int = 0  # prompt tokens computed (recomputation included)
    generation_tokens: int = 0
    forward_s: float = 0.0
    context_restarts: int = 0
    request_failures: int = 0  # requests ended by an error in a step (their contents, or OOM alone)
    oom_retries: int = 0  # steps that ran out of device memory (and were retried, smaller)
    step_s: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)  # samples, by finish reason


class StepReporter:
    """Reports an engine's load to its LoadSink and its steps to its ReportSink (either may be
    absent); gathers the inter-token gaps in between, when there is a ReportSink to send them to."""

    def __init__(self, model: str, engine: str, metrics: ReportSink | None, load_sink: LoadSink | None) -> None:
        self.model, self.engine = model, engine
        self.metrics = metrics
        self.load_sink = load_sink
        self._itl: list[float] = []
        self._reported = (0, 0, 0)  # prefix queries, prefix hits, preemptions at the last report

    @property
    def wants_details(self) -> bool:
        """Whether per-token gaps and finished-request records are wanted (they cost a little)."""
        return self.metrics is not None

    def inter_token(self, seconds: float) -> None:
        self._itl.append(seconds)

    def started(self, bm: BlockManager) -> None:
        if self.metrics is not None:
            self.metrics.report(EngineInfo(self.model, self.engine, bm.block_size, bm.num_blocks,
                                           bm.enable_prefix_caching))

    def step(self, scheduler: Scheduler, bm: BlockManager, finished: list[FinishedRequest],
             num_scheduled: int, iteration_tokens: int, prompt: int, generated: int) -> None:
        """After a step (all zeros: the engine went idle)."""
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        if self.load_sink is not None:
            self.load_sink.report_load(self.engine, running + waiting + bm.usage)
        if self.metrics is None:
            return
        counts = (bm.prefix_queries, bm.prefix_hits, scheduler.num_preemptions)
        q, h, p = (a - b for a, b in zip(counts, self._reported, strict=True))
        self._reported = counts
        self.metrics.report(StepReport(
            model=self.model, engine=self.engine, num_running=running, num_waiting=waiting,
            kv_usage=bm.usage, num_scheduled=num_scheduled, iteration_tokens=iteration_tokens,
            prompt_tokens=prompt, generation_tokens=generated, prefix_queries=q, prefix_hits=h,
            preemptions=p, inter_token_s=self._itl, finished=finished,
        ))
        self._itl = []
