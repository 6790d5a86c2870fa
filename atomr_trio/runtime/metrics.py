"""Metrics: the actor that turns engine step reports into Prometheus series and a periodic log.

Invariants:
- Others hold a `MetricsHandle`. Engines report with `report()` and the gateway counts a request's
  outcome with `count_request()`: both are messages that never block (a full inbox drops the
  message and counts the drop, `atomr:metrics_dropped_reports` — the one series a caller bumps,
  since the actor never hears of what did not reach it), so metrics can never slow a step loop
  or a request. Every other series is written by the actor's own task.
- The actor publishes a `MetricsSnapshot` (state, inbox depth) on its Board.
- Every timestamp in a report was taken in the engine with a monotonic clock.
- Series carry vLLM's names under a prefix: `atomr:` (the default) or `vllm:`. With `vllm` every
  series vLLM also has is exactly vLLM's (name, type, labels `model_name` and `engine` with the
  engine's replica index), plus the older names vLLM's dashboards and endpoint pickers may still
  read (`gpu_cache_usage_perc`, `time_per_output_token_seconds`), so they read ours unchanged.
  Series vLLM has no counterpart for keep the `atomr:` prefix either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.messages import Board
from ..engine.reports import EngineInfo, StepReport

log = logging.getLogger("atomr_trio.runtime.metrics")

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


PREFIXES = ("atomr", "vllm")


@dataclass(frozen=True)
class RequestOutcome:
    """How one request routed to a deployment ended (`atomr:deployment_requests{outcome}`)."""

    deployment: str
    outcome: str


@dataclass(frozen=True)
class MetricsSnapshot:
    state: str  # "created" | "running" | "stopped"
    inbox_depth: int


class MetricsHandle:
    """What others hold of the Metrics actor: non-blocking messages, the rendered series and
    its snapshot."""

    def __init__(self, send: trio.MemorySendChannel[StepReport | EngineInfo | RequestOutcome],
                 board: Board[MetricsSnapshot], registry: CollectorRegistry, dropped: Counter) -> None:
        self._send, self._board, self._registry, self._dropped = send, board, registry, dropped

    def report(self, rep: StepReport | EngineInfo) -> None:
        """Hand a step's report over without ever blocking the caller."""
        self._tell(rep)

    def count_request(self, deployment: str, outcome: str) -> None:
        self._tell(RequestOutcome(deployment, outcome))

    def _tell(self, msg: StepReport | EngineInfo | RequestOutcome) -> None:
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self._dropped.inc()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the runtime is stopping

    def render(self) -> bytes:
        """The Prometheus text of every series (prometheus_client reads its registry safely
        while the actor writes it)."""
        return generate_latest(self._registry)

    def snapshot(self) -> MetricsSnapshot:
        return replace(self._board.read(), inbox_depth=self._send.statistics().current_buffer_used)


class Metrics:
    def __init__(self, log_interval_s: float = 5.0, prefix: str = "atomr") -> None:
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix must be one of {', '.join(PREFIXES)}, not {prefix!r}")
        self.prefix = prefix
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{prefix}:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{prefix}:{name}", doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = [gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)")]
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = counter("num_preemptions", "Sequences preempted")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.success = counter("request_success", "Finished requests by finish reason", ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token")
        self.itl = [histogram("inter_token_latency_seconds", "Time between two tokens of a sequence")]
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: first token to finish over the tokens after the first")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled")
        self.inference = histogram("request_inference_time_seconds", "First scheduled to finish")
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token")
        self.decode = histogram("request_decode_time_seconds", "First token to finish")
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per step", _TOKENS)
        self.req_prompt = histogram("request_prompt_tokens", "Prompt tokens of finished requests", _TOKENS)
        self.req_gen = histogram("request_generation_tokens", "Tokens generated per request", _TOKENS)
        self.req_max_gen = histogram("request_max_num_generation_tokens",
                                     "Tokens generated by the longest sample of a request", _TOKENS)
        self.req_n = histogram("request_params_n", "The n parameter of finished requests", (1, 2, 5, 10, 20))
        self.req_max_tokens = histogram("request_params_max_tokens",
                                        "The max_tokens parameter of finished requests", _TOKENS)
        self.cache_info = Gauge(f"{prefix}:cache_config_info", "KV cache of each engine (always 1)",
                                [*labels, "block_size", "num_gpu_blocks", "enable_prefix_caching"], registry=r)
        if prefix == "vllm":  # names older vLLM versions (and what reads them) use for the same values
            self.kv_usage.append(gauge("gpu_cache_usage_perc", "Fraction of KV blocks in use (0-1)"))
            self.itl.append(histogram("time_per_output_token_seconds", "Time between two tokens of a sequence"))
        # ours alone: always under atomr:
        self.steps = Counter("atomr:engine_steps", "Engine steps", labels, registry=r)
        self.multi_seq_steps = Counter("atomr:engine_multi_sequence_steps",
                                       "Engine steps whose batch carried more than one sequence", labels, registry=r)
        self.deployment_requests = Counter("atomr:deployment_requests", "Requests by deployment and outcome",
                                           ["deployment", "outcome"], registry=r)
        self.dropped = Counter("atomr:metrics_dropped_reports", "Step reports dropped (inbox full)",
                               registry=r)
        self._send, self._inbox = trio.open_memory_channel[StepReport | EngineInfo | RequestOutcome](4096)
        self._board = Board(MetricsSnapshot("created", 0))
        self.handle = MetricsHandle(self._send, self._board, r, self.dropped)
        self._interval = log_interval_s
        self._window = {"prompt": 0, "gen": 0, "queries": 0, "hits": 0}
        self._latest: dict[tuple[str, str], StepReport] = {}

    async def run(self, *, task_status: trio.TaskStatus[MetricsHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self._board.publish(MetricsSnapshot("running", 0))
        try:
            async with self._inbox, trio.open_nursery() as nursery:
                nursery.start_soon(self._log_loop)
                task_status.started(self.handle)
                async for msg in self._inbox:
                    if isinstance(msg, RequestOutcome):
                        self.deployment_requests.labels(msg.deployment, msg.outcome).inc()
                    elif isinstance(msg, EngineInfo):
                        self.cache_info.labels(msg.model, self._engine(msg.engine), str(msg.block_size),
                                               str(msg.num_blocks), str(msg.prefix_caching)).set(1)
                    else:
                        self._apply(msg)
        finally:
            self._board.publish(MetricsSnapshot("stopped", 0))

    def _engine(self, name: str) -> str:
        """The `engine` label: our engine's name, or under vllm: its replica index, as vLLM labels
        its data-parallel engines ("dep/engine-1" -> "1")."""
        index = name.rsplit("engine-", 1)[-1]
        return index if self.prefix == "vllm" and index.isdigit() else name

    def _apply(self, rep: StepReport) -> None:
        lb = (rep.model, self._engine(rep.engine))
        self.running.labels(*lb).set(rep.num_running)
        self.waiting.labels(*lb).set(rep.num_waiting)
        for g in self.kv_usage:
            g.labels(*lb).set(rep.kv_usage)
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
        if rep.inter_token_s:
            for h in self.itl:
                child = h.labels(*lb)
                for gap in rep.inter_token_s:
                    child.observe(gap)
        for f in rep.finished:
            self.success.labels(*lb, f.reason).inc()
            self.e2e.labels(*lb).observe(f.e2e_s)
            self.req_prompt.labels(*lb).observe(f.prompt_tokens)
            self.req_gen.labels(*lb).observe(f.generation_tokens)
            self.req_max_gen.labels(*lb).observe(f.max_generation_tokens)
            self.req_n.labels(*lb).observe(f.n)
            if f.max_tokens is not None:
                self.req_max_tokens.labels(*lb).observe(f.max_tokens)
            inference = f.e2e_s - f.queue_s if f.queue_s is not None else None
            tpot = (f.decode_s / (f.max_generation_tokens - 1)
                    if f.decode_s is not None and f.max_generation_tokens > 1 else None)
            for hist, secs in ((self.queue, f.queue_s), (self.ttft, f.ttft_s), (self.prefill, f.prefill_s),
                               (self.decode, f.decode_s), (self.inference, inference), (self.tpot, tpot)):
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
