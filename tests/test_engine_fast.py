"""The engine and its request owner (`AsyncLLM.generate`) on a tiny random model, fast enough for
`make test-fast`: the engine's own random generator, one EOS set, requests that leave the engine
(and its counters) exactly once, aborts that free every block at once, owners that abort
what their consumer walked away from, and the engine's Worker: a device thread only while the
engine runs, a rebuilt Context that requests never notice (and the views do), a restart budget
past which the engine fails, and no polling when nothing can be scheduled."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
import torch
import trio
from conftest import core_of

from atomr_trio import SamplingParams
from atomr_trio.async_llm import AsyncLLM, engine_config, open_engine
from atomr_trio.engine.engine_core import EngineCore, EngineFailed, EngineHandle
from atomr_trio.engine.messages import AddRequest, SeqDelta
from atomr_trio.engine.outbox import Outbox
from atomr_trio.engine.scheduler import SchedulerOutput
from atomr_trio.engine.sequence import SeqStatus
from atomr_trio.executor import worker as worker_module
from atomr_trio.executor.context import Context
from atomr_trio.executor.worker import Faults
from atomr_trio.model_source import ModelSource
from atomr_trio.outputs import RequestError
from atomr_trio.runtime.deployment_spec import DeploymentSpec


@asynccontextmanager
async def engine_on(source: ModelSource, **settings: Any) -> AsyncIterator[AsyncLLM]:
    """An engine over an already opened source, with small test settings."""
    settings = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "torch_threads": 1, **settings}
    async with open_engine(source, **settings) as engine:
        yield engine


def prompt(i: int = 0, n: int = 9) -> dict[str, list[int]]:
    return {"prompt_token_ids": [(13 * i + 7 * j) % 250 + 3 for j in range(n)]}


def tokens(out: Any) -> list[int]:
    return list(out.outputs[0].token_ids)


async def wait_until(cond: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


# ---- the engine's random generator ---------------------------------------------------------
async def test_sampling_never_touches_the_global_torch_rng(tiny_source: ModelSource) -> None:
    unseeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, ignore_eos=True)
    seeded = dataclasses.replace(unseeded, seed=1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)  # the user's own seeded torch code
        before = torch.random.get_rng_state()
        async with engine_on(tiny_source) as engine:
            a = tokens(await engine.generate_one(prompt(), unseeded))
            b = tokens(await engine.generate_one(prompt(), unseeded))
            s1 = tokens(await engine.generate_one(prompt(), seeded))
            results: dict[str, list[int]] = {}

            async def run(name: str, params: SamplingParams) -> None:
                results[name] = tokens(await engine.generate_one(prompt(), params))

            async with trio.open_nursery() as nursery:  # seeded, batched with unseeded neighbours
                nursery.start_soon(run, "x", unseeded)
                nursery.start_soon(run, "seeded", seeded)
                nursery.start_soon(run, "y", unseeded)
        assert torch.equal(torch.random.get_rng_state(), before), "the engine used or reseeded the global RNG"
    assert a != b, "unseeded sampling must vary between requests"
    assert s1 == results["seeded"], "a seeded request must not depend on the batch or the engine's stream"


async def test_each_engine_draws_its_own_stream_from_its_seed(tiny_source: ModelSource) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    firsts = []
    for seed in (0, 0, 1):
        async with engine_on(tiny_source, seed=seed) as engine:
            firsts.append(tokens(await engine.generate_one(prompt(), params)))
    assert firsts[0] == firsts[1], "an engine's unseeded stream follows EngineConfig.seed"
    assert firsts[0] != firsts[2]
    # data-parallel replicas of one deployment get different seeds, hence different streams
    spec = DeploymentSpec(name="m")
    assert len({spec.engine_config(1, i).seed for i in range(4)}) == 4


# ---- one EOS set -----------------------------------------------------------------------------
async def test_an_eos_id_only_the_model_config_lists_ends_requests_everywhere(tiny_source: ModelSource) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    async with engine_on(tiny_source) as engine:
        free_run = tokens(await engine.generate_one(prompt(), greedy))
    k = next(i for i in range(2, 8) if free_run[i] not in free_run[:i])
    extra = free_run[k]  # the greedy run's (k+1)-th token becomes an EOS the tokenizer does not know
    config = dataclasses.replace(tiny_source.config, eos_token_ids=(*tiny_source.config.eos_token_ids, extra))
    source = dataclasses.replace(tiny_source, config=config)
    assert extra not in source.tokenizer.eos_token_ids and extra in source.eos_token_ids
    async with engine_on(source) as engine:
        out = (await engine.generate_one(prompt(), SamplingParams(temperature=0, max_tokens=8))).outputs[0]
        # the engine stops on it and the tracker names it
        assert out.token_ids == free_run[: k + 1]
        assert (out.finish_reason, out.stop_reason) == ("stop", extra)
        # the sampler holds it back until min_tokens
        held = (await engine.generate_one(prompt(), SamplingParams(temperature=0, max_tokens=k + 2,
                                                                   min_tokens=k + 2))).outputs[0]
        assert held.token_ids[:k] == free_run[:k] and extra not in held.token_ids
        assert held.finish_reason == "length"
        assert tokens(await engine.generate_one(prompt(), greedy)) == free_run  # ignore_eos goes through it


# ---- requests leave the engine exactly once ------------------------------------------------------
async def test_finished_requests_leave_the_table_and_are_counted_exactly(tiny_source: ModelSource) -> None:
    async with engine_on(tiny_source, max_num_seqs=4) as engine:
        core = core_of(engine)

        async def run(i: int, params: SamplingParams) -> None:
            await engine.generate_one(prompt(i), params)

        async def walk_away(i: int) -> None:
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            async with aclosing(engine.generate(prompt(i), params)) as stream:
                async for out in stream:
                    if len(tokens(out)) >= 2:
                        break

        async with trio.open_nursery() as nursery:
            for i in range(5):  # more requests than batch slots: some wait
                nursery.start_soon(run, i, SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True))
            nursery.start_soon(run, 5, SamplingParams(n=2, temperature=1.0, max_tokens=4, ignore_eos=True))
            nursery.start_soon(run, 6, SamplingParams(temperature=0, stop_token_ids=list(range(256))))
            nursery.start_soon(walk_away, 7)
            nursery.start_soon(walk_away, 8)
        # The walk-aways' aborts are messages: a request sent after them is handled after them.
        await run(9, SamplingParams(temperature=0, max_tokens=2))
        snap = engine.stats()
        assert snap["num_requests"] == 0, "a finished request stayed in the engine's request table"
        assert (snap["num_requests_running"], snap["num_requests_waiting"]) == (0, 0)
        assert core.stats.finished == {"length": 5 + 2 + 1, "stop": 1, "abort": 2}  # one count per sample


# ---- aborts ---------------------------------------------------------------------------------------
async def test_abort_mid_generation_frees_every_block_at_once(tiny_source: ModelSource) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    async with engine_on(tiny_source, enable_prefix_caching=False, block_size=16) as engine:
        core, bm = core_of(engine), core_of(engine).block_manager
        other_alone = tokens(await engine.generate_one(prompt(1), short))
        outbox: Outbox[SeqDelta] = Outbox()
        await core.handle.add(AddRequest("victim", prompt(0, 40)["prompt_token_ids"], params, outbox))
        other: list[int] = []

        async def run_other() -> None:
            other.extend(tokens(await engine.generate_one(prompt(1), short)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_other)
            generated = 0
            while generated < 3:
                generated += sum(len(d.new_token_ids) for d in await outbox.get())
            (victim,) = [s for s in core.scheduler.running if s.request_id == "victim"]
            assert len(victim.block_table) >= 3
            await core.handle.abort("victim")
            final: list[SeqDelta] = []
            while not final:
                final = [d for d in await outbox.get() if d.finish_reason is not None]
            # The engine handled the abort between two steps: every block of the victim is free
            # now, not when a later step or a cleanup gets to it.
            assert final[0].finish_reason == "abort"
            assert victim.status is SeqStatus.FINISHED and victim.block_table == []
            assert victim not in core.scheduler.running + core.scheduler.waiting
            held = {b for s in core.scheduler.running for b in s.block_table}
            assert bm.num_free_blocks + len(held) == bm.num_blocks
        assert other == other_alone  # the batch it left went on undisturbed
        assert engine.stats()["num_requests"] == 0 and bm.num_free_blocks == bm.num_blocks
        assert core.stats.finished == {"length": 2, "abort": 1}


@pytest.mark.parametrize("how", ["break", "cancel"])
async def test_the_owner_aborts_a_request_whose_consumer_walked_away(tiny_source: ModelSource, how: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    async with engine_on(tiny_source) as engine:
        core = core_of(engine)
        if how == "break":  # the consumer stops reading and closes the stream
            async with aclosing(engine.generate(prompt(), params)) as stream:
                async for out in stream:
                    if len(tokens(out)) >= 3:
                        break
        else:  # the consumer is cancelled (an HTTP client that disconnected) while it waits
            with trio.CancelScope() as scope:
                async for out in engine.generate(prompt(), params):
                    if len(tokens(out)) >= 3:
                        scope.cancel()
        await wait_until(lambda: engine.stats()["num_requests"] == 0, timeout=2.0)
        assert core.stats.finished == {"abort": 1}
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
        steps = core.stats.steps
        await trio.sleep(0.2)
        assert core.stats.steps == steps  # the engine stopped working on it


# ---- chunked prefill through the scheduler ------------------------------------------------------
async def test_a_small_token_budget_splits_prompts_without_changing_tokens_or_logprobs(
        tiny_source: ModelSource) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    prompts = [prompt(i, n) for i, n in ((0, 23), (1, 11), (2, 30))]

    async def run_all(**settings: Any) -> tuple[list[Any], dict[str, Any]]:
        async with engine_on(tiny_source, block_size=4, enable_prefix_caching=False, **settings) as engine:
            outs: list[Any] = [None] * len(prompts)

            async def one(i: int) -> None:
                outs[i] = (await engine.generate_one(prompts[i], params)).outputs[0]

            async with trio.open_nursery() as nursery:  # at once: decodes and prompt chunks mix
                for i in range(len(prompts)):
                    nursery.start_soon(one, i)
            return outs, engine.stats()

    whole, _ = await run_all()
    chunked, stats = await run_all(max_num_batched_tokens=8)
    # every prompt was split, and steps mixed sequences (decodes with prompt chunks)
    assert stats["steps"] >= sum(len(p["prompt_token_ids"]) for p in prompts) // 8
    assert stats["multi_seq_steps"] > 0
    for w, c in zip(whole, chunked, strict=True):
        assert c.token_ids == w.token_ids
        for lw, lc in zip(w.logprobs, c.logprobs, strict=True):
            assert lw.keys() == lc.keys()
            for tok in lw:
                assert lc[tok].logprob == pytest.approx(lw[tok].logprob, abs=1e-4)


# ---- the engine's Worker: threads, rebuilds, failure, no polling ---------------------------------
@asynccontextmanager
async def core_on(source: ModelSource, name: str, faults: Faults | None = None,
                  **settings: Any) -> AsyncIterator[tuple[EngineCore, AsyncLLM]]:
    """An EngineCore run directly (open_engine takes no fault hook); an EngineFailed that ends
    it is kept in `failed` instead of raised."""
    settings = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "torch_threads": 1, **settings}
    core = EngineCore(source, engine_config(None, **settings).resolve(source.config), name, faults=faults)

    async def run(task_status: trio.TaskStatus[EngineHandle] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await core.run(task_status=task_status)
        except EngineFailed as e:
            failed.append(e)

    failed: list[EngineFailed] = []
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(run)
        yield core, AsyncLLM(handle, source)
        nursery.cancel_scope.cancel()


def device_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{name}-device"]


async def test_an_engine_holds_a_device_thread_only_while_it_runs(tiny_source: ModelSource) -> None:
    cfg = engine_config(None, dtype="float32", num_kv_blocks=64, max_model_len=256).resolve(tiny_source.config)
    before = threading.active_count()
    idle = EngineCore(tiny_source, cfg, "never-run")
    assert threading.active_count() == before and device_threads("never-run") == []
    assert (idle.snapshot().state, idle.snapshot().worker.state) == ("created", "starting")
    async with core_on(tiny_source, "runs") as (core, engine):
        assert len(device_threads("runs")) == 1
        await engine.generate_one(prompt(), SamplingParams(temperature=0, max_tokens=3))
    assert device_threads("runs") == [], "the device thread outlived its engine"
    assert (core.handle.snapshot().state, core.handle.snapshot().worker.state) == ("stopped", "stopped")


async def test_a_context_rebuild_is_invisible_to_requests_and_shows_in_the_snapshot(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    async with engine_on(tiny_source) as engine:
        want = tokens(await engine.generate_one(prompt(), params))
    release = threading.Event()

    class SlowRebuild(Context):  # the second build waits, so the rebuild can be watched
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            builds.append(1)
            if len(builds) > 1:
                release.wait(10)
            super().__init__(*args, **kwargs)

    builds: list[int] = []
    monkeypatch.setattr(worker_module, "Context", SlowRebuild)
    async with core_on(tiny_source, "flaky", Faults(at_step=5)) as (core, engine):
        got: list[int] = []

        async def run() -> None:
            got.extend(tokens(await engine.generate_one(prompt(), params)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_until(lambda: core.handle.snapshot().state == "restarting")
            # the views see the Worker's own state while the engine waits on it
            worker = core.handle.snapshot().worker
            assert (worker.state, worker.context_builds) == ("rebuilding", 1)
            release.set()
        snap = core.handle.snapshot()
        assert got == want  # recomputed from its tokens: the request saw nothing
        assert (snap.state, snap.context_restarts, snap.request_failures) == ("serving", 1, 0)
        assert (snap.worker.state, snap.worker.context_builds, snap.worker.inbox_depth) == ("ready", 2, 0)


async def test_past_the_restart_budget_the_engine_fails_and_ends_its_requests(tiny_source: ModelSource) -> None:
    async with core_on(tiny_source, "broken", Faults(at_step=1, times=100)) as (core, engine):
        with pytest.raises(RequestError, match="device context failed repeatedly"):
            await engine.generate_one(prompt(), SamplingParams(temperature=0, max_tokens=4))
        await wait_until(lambda: core.handle.snapshot().state == "failed")
        snap = core.handle.snapshot()
        assert snap.failure is not None and "InjectedFault" in snap.failure
        assert snap.context_restarts == 3  # 3 rebuilds in 60 s, then no more
        assert (snap.worker.state, snap.worker.context_builds) == ("stopped", 4)
        assert snap.num_requests == 0 and device_threads("broken") == []


async def test_with_nothing_schedulable_the_engine_waits_for_a_message_instead_of_spinning(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine_on(tiny_source) as engine:
        core = core_of(engine)
        original, calls, stuck = core.scheduler.schedule, [0], [True]

        def schedule() -> SchedulerOutput:
            calls[0] += 1
            return SchedulerOutput() if stuck[0] else original()

        monkeypatch.setattr(core.scheduler, "schedule", schedule)
        got: list[int] = []

        async def run() -> None:
            got.extend(tokens(await engine.generate_one(prompt(), SamplingParams(temperature=0, max_tokens=3))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_until(lambda: calls[0] > 0)
            await trio.sleep(0.2)
            assert calls[0] == 1, "the engine polled the scheduler with no message in between"
            stuck[0] = False
            await engine.engine.abort("no-such-request")  # any message makes it look again
        assert len(got) == 3
