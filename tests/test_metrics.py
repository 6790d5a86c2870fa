"""/metrics: the series and their names under both prefixes (the Metrics actor alone), and a live
server with `--metrics-prefix vllm` on a tiny random model whose KV cache is small enough that
concurrent requests preempt each other — the counters must match the engine's own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from serverproc import Server, metric
from test_hf_dir import write_tiny_model

from atomr_trio.engine.reports import EngineInfo, FinishedRequest, StepReport
from atomr_trio.runtime.metrics import Metrics, MetricsSnapshot

# vLLM v1's series (Prometheus names as /metrics shows them, counters with their _total).
VLLM_SERIES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds", "vllm:iteration_tokens_total",
    "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_max_num_generation_tokens",
    "vllm:request_params_n", "vllm:request_params_max_tokens", "vllm:cache_config_info",
}


def series(text: str) -> set[str]:
    """The series names a dashboard queries (the text format's TYPE lines: counters with `_total`,
    histograms without their `_bucket`/`_sum`/`_count`), leaving out the `_created` companions."""
    return {name for line in text.splitlines() if line.startswith("# TYPE ")
            for name in [line.split()[2]] if not name.endswith("_created")}


def _step(engine: str, **kw: object) -> StepReport:
    base: dict = dict(model="m", engine=engine, num_running=3, num_waiting=2, kv_usage=0.5, num_scheduled=3,
                      iteration_tokens=40, prompt_tokens=37, generation_tokens=3, prefix_queries=16,
                      prefix_hits=8, preemptions=1, inter_token_s=[0.01, 0.02])
    base.update(kw)
    return StepReport(**base)


async def _fed(prefix: str) -> str:
    actor = Metrics(prefix=prefix)
    m = actor.handle  # what engines and the gateway hold
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        m.report(EngineInfo("m", "m/engine-1", 16, 64, True))
        done = FinishedRequest("length", 10, 12, 2.0, 0.1, 0.5, 0.4, 1.5, n=2, max_tokens=6, max_generation_tokens=6)
        m.report(_step("m/engine-1", finished=[done]))
        m.count_request("dep", "success")
        await trio.testing.wait_all_tasks_blocked()
        assert m.snapshot() == MetricsSnapshot("running", 0)
        nursery.cancel_scope.cancel()
    assert m.snapshot().state == "stopped"
    return m.render().decode()


async def test_vllm_prefix_gives_vllm_names_and_labels() -> None:
    text = await _fed("vllm")
    names = series(text)
    ours = {n for n in names if n.startswith("vllm:")}
    assert ours == VLLM_SERIES, (ours ^ VLLM_SERIES)  # nothing missing, no invented vllm: name
    assert names - ours == {"atomr:engine_steps_total", "atomr:engine_multi_sequence_steps_total",
                            "atomr:deployment_requests_total", "atomr:metrics_dropped_reports_total"}
    lb = {"model_name": "m", "engine": "1"}  # vLLM labels the replica by its index
    assert metric(text, "vllm:num_requests_waiting", **lb) == 2
    assert metric(text, "vllm:kv_cache_usage_perc", **lb) == metric(text, "vllm:gpu_cache_usage_perc", **lb) == 0.5
    assert metric(text, "vllm:num_preemptions_total", **lb) == 1
    assert metric(text, "vllm:request_success_total", finished_reason="length", **lb) == 1
    assert metric(text, "vllm:time_per_output_token_seconds_count", **lb) == 2  # the ITL under its old name
    assert metric(text, "vllm:request_time_per_output_token_seconds_sum", **lb) == pytest.approx(1.5 / 5)
    assert metric(text, "vllm:request_inference_time_seconds_sum", **lb) == pytest.approx(1.9)
    assert metric(text, "vllm:request_max_num_generation_tokens_sum", **lb) == 6
    assert metric(text, "vllm:cache_config_info", block_size="16", num_gpu_blocks="64", **lb) == 1


async def test_default_prefix_keeps_atomr_names() -> None:
    text = await _fed("atomr")
    names = series(text)
    assert not any(n.startswith("vllm:") for n in names)
    assert {n.replace("atomr:", "vllm:") for n in names} >= VLLM_SERIES - {
        "vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"}
    assert metric(text, "atomr:num_requests_waiting", model_name="m", engine="m/engine-1") == 2
    # the gateway's count arrives as a message, and the actor bumps the counter
    assert metric(text, "atomr:deployment_requests_total", deployment="dep", outcome="success") == 1
    with pytest.raises(ValueError, match="prefix"):
        Metrics(prefix="sglang")


# ---- a live server ------------------------------------------------------------------------------

BLOCKS = 8  # KV blocks of 16 tokens: two requests of 110 tokens cannot both hold theirs


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tiny = tmp_path_factory.mktemp("tiny-metrics")
    write_tiny_model(tiny, "qwen2")
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head size 16, float32
    s = Server("--model", str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--block-size", "16",
               "--kv-cache-memory-bytes", str(BLOCKS * per_block), "--metrics-prefix", "vllm")
    yield s
    assert s.stop() == 0


@pytest.mark.slow
async def test_vllm_series_move_and_preemptions_match_the_engine(server: Server) -> None:
    lb = {"model_name": "tiny", "engine": "0"}
    n_requests, max_tokens = 8, 100
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        text = (await c.get("/metrics")).text
        assert metric(text, "vllm:cache_config_info", num_gpu_blocks=str(BLOCKS), block_size="16", **lb) == 1
        for gauge in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            assert f"{gauge}{{" in text, gauge  # published while idle
        assert metric(text, "vllm:time_to_first_token_seconds_count", **lb) == 0
        seen = {"vllm:num_requests_waiting": 0.0, "vllm:num_requests_running": 0.0, "vllm:kv_cache_usage_perc": 0.0}
        done = trio.Event()

        async def one(i: int) -> None:
            body = {"model": "tiny", "prompt": [5 + i, 17, 99, 3, 200, 41, 7, 8, 9, 10], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == max_tokens

        async def watch() -> None:
            while not done.is_set():
                text = (await c.get("/metrics")).text
                for name in seen:
                    seen[name] = max(seen[name], metric(text, name, **lb))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as requests:
                for i in range(n_requests):
                    requests.start_soon(one, i)
            done.set()
        assert all(v > 0 for v in seen.values()), seen

        deadline = time.monotonic() + 10
        while True:  # the Metrics actor applies reports a moment after the engine sends them
            text = (await c.get("/metrics")).text
            engine = (await c.get("/admin/deployments/tiny")).json()["replicas"][0]
            busy = metric(text, "vllm:num_requests_running", **lb) + metric(text, "vllm:num_requests_waiting", **lb)
            if not busy and metric(text, "vllm:num_preemptions_total", **lb) == engine["num_preemptions"]:
                break
            assert time.monotonic() < deadline, (metric(text, "vllm:num_preemptions_total", **lb), engine)
    assert engine["num_preemptions"] > 0  # the run did preempt, and /metrics counted every one
    assert metric(text, "vllm:request_success_total", finished_reason="length", **lb) == n_requests
    assert metric(text, "vllm:generation_tokens_total", **lb) == engine["generation_tokens"] == n_requests * max_tokens
    assert metric(text, "vllm:prompt_tokens_total", **lb) == engine["prompt_tokens"] > 0
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_time_per_output_token_seconds"):
        assert metric(text, f"{hist}_count", **lb) == n_requests, hist
    for hist in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert metric(text, f"{hist}_count", **lb) >= n_requests * (max_tokens - 1), hist
        assert metric(text, f"{hist}_sum", **lb) > 0
    assert metric(text, "vllm:kv_cache_usage_perc", **lb) == 0


@pytest.mark.slow
def test_the_tiny_kv_cache_holds_the_blocks_meant(tmp_path: Path) -> None:
    """The block arithmetic of the server fixture matches the engine's (a wrong guess would not preempt)."""
    from atomr_trio.engine.engine_config import EngineConfig
    from atomr_trio.model_source import ModelSource

    write_tiny_model(tmp_path, "qwen2")
    src = ModelSource.open(str(tmp_path))
    cfg = EngineConfig(dtype="float32", block_size=16, kv_cache_memory_bytes=BLOCKS * 8192).resolve(src.config)
    assert cfg.num_kv_blocks == BLOCKS
