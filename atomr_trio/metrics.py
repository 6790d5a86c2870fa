"""Metrics: the actor that turns engine step reports into Prometheus series and a periodic log.

Invariants:
- Engines report with `report()`, which never blocks: a full inbox drops the report and counts
  the drop (`atomr:metrics_dropped_reports`), so metrics can never slow the step loop.
- Every timestamp in a report was taken in the engine with a monotonic clock.
- Series follow vLLM's names under the `atomr:` prefix, labelled `model_name` and `engine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("atomr_trio.metrics")

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


@dataclass(frozen=True)
class FinishedRequest:
    reason: str
    prompt_tokens: int
    generation_tokens: int
    e2e_s: float
    queue_s: float | None
    ttft_s: float | None
    prefill_s: float | None
    decode_s: float | None


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


class Metrics:
    def __init__(self, log_interval_s: float = 5.0) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"atomr:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"atomr:{name}", doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY) -> Histogram:
            return Histogram(f"atomr:{name}", doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = counter("num_preemptions", "Sequences preempted")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.success = counter("request_success", "Finished requests by finish reason", ("finished_reason",))
        self.steps = counter("engine_steps", "Engine steps")
        self.multi_seq_steps = counter("engine_multi_sequence_steps",
                                       "Engine steps whose batch carried more than one sequence")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a sequence")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled")
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token")
        self.decode = histogram("request_decode_time_seconds", "First token to finish")
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per step", _TOKENS)
        self.req_prompt = histogram("request_prompt_tokens", "Prompt tokens of finished requests", _TOKENS)
        self.req_gen = histogram("request_generation_tokens", "Tokens generated per request", _TOKENS)
        self.deployment_requests = Counter("atomr:deployment_requests", "Requests by deployment and outcome",
                                           ["deployment", "outcome"], registry=r)
        self.dropped = Counter("atomr:metrics_dropped_reports", "Step reports dropped (inbox full)",
                               registry=r)
        self._send, self._inbox = trio.open_memory_channel[StepReport](4096)
        self._interval = log_interval_s
        self._window = {"prompt": 0, "gen": 0, "queries": 0, "hits": 0}
        self._latest: dict[tuple[str, str], StepReport] = {}

    def report(self, rep: StepReport) -> None:
        """Hand a step's report over without ever blocking the caller."""
        try:
            self._send.send_nowait(rep)
        except trio.WouldBlock:
            self.dropped.inc()

    def count_request(self, deployment: str, outcome: str) -> None:
        self.deployment_requests.labels(deployment, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._log_loop)
            async for rep in self._inbox:
                self._apply(rep)

    def _apply(self, rep: StepReport) -> None:
        lb = (rep.model, rep.engine)
        self.running.labels(*lb).set(rep.num_running)
        self.waiting.labels(*lb).set(rep.num_waiting)
        self.kv_usage.labels(*lb).set(rep.kv_usage)
        if rep.num_scheduled:  # an idle report (num_scheduled 0) only refreshes the gauges
            self.steps.labels(*lb).inc()
        if rep.num_scheduled > 1:
            self.multi_seq_steps.labels(*lb).inc()
        if rep.iteration_tokens:
            self.iteration_tokens.labels(*lb).observe(rep.iteration_tokens)
        for counter, value in ((self.prompt_tokens, rep.prompt_tokens),
                               (self.generation_tokens, rep.generation_tokens),
                               (self.prefix_queries, rep.prefix_queries), (self.prefix_hits, rep.prefix_hits),
                               (self.preemptions, rep.preemptions)):
            if value:
                counter.labels(*lb).inc(value)
        itl = self.itl.labels(*lb)
        for s in rep.inter_token_s:
            itl.observe(s)
        for f in rep.finished:
            self.success.labels(*lb, f.reason).inc()
            self.e2e.labels(*lb).observe(f.e2e_s)
            self.req_prompt.labels(*lb).observe(f.prompt_tokens)
            self.req_gen.labels(*lb).observe(f.generation_tokens)
            for hist, secs in ((self.queue, f.queue_s), (self.ttft, f.ttft_s), (self.prefill, f.prefill_s),
                               (self.decode, f.decode_s)):
                if secs is not None:
                    hist.labels(*lb).observe(secs)
        w = self._window
        w["prompt"] += rep.prompt_tokens
        w["gen"] += rep.generation_tokens
        w["queries"] += rep.prefix_queries
        w["hits"] += rep.prefix_hits
        self._latest[lb] = rep

    async def _log_loop(self) -> None:
        while True:
            await trio.sleep(self._interval)
            w = self._window
            if not (w["prompt"] or w["gen"]):
                continue
            reps = list(self._latest.values())
            hit = w["hits"] / w["queries"] if w["queries"] else 0.0
            log.info(
                "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV usage %.1f%%, "
                "prefix-cache hit rate %.1f%%",
                w["prompt"] / self._interval, w["gen"] / self._interval,
                sum(r.num_running for r in reps), sum(r.num_waiting for r in reps),
                100 * max((r.kv_usage for r in reps), default=0.0), 100 * hit,
            )
            self._window = {"prompt": 0, "gen": 0, "queries": 0, "hits": 0}
