"""Async scheduling on a tiny random model: the engine schedules step N+1 while step N runs (its
sampled tokens filled in on the device thread), and users see exactly what they would with
steps taken in turn — tokens, logprobs, finish reasons, usage — whatever ends a request while
a step behind it is in flight (a stop token, max_tokens, the context's end, an abort), and when
that step or the one before it fails."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from atomr_trio import SamplingParams
from atomr_trio.async_llm import AsyncLLM, open_engine
from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.executor import worker as worker_module
from atomr_trio.executor.model_runner import StepBatch, StepResult
from atomr_trio.executor.worker import Faults
from atomr_trio.executor.worker_handle import PredecessorFailed
from atomr_trio.model_source import ModelSource
from atomr_trio.outputs import RequestOutput

MAX_MODEL_LEN = 96


@asynccontextmanager
async def engine(source: ModelSource, asynchronous: bool, **settings: Any) -> AsyncIterator[AsyncLLM]:
    # 16-token blocks: requests of a few dozen tokens fill blocks while steps are in flight
    settings = {"dtype": "float32", "num_kv_blocks": 64, "block_size": 16, "max_model_len": MAX_MODEL_LEN,
                "torch_threads": 1,
                "async_scheduling": asynchronous, **settings}
    async with open_engine(source, **settings) as llm:
        yield llm


def prompt(i: int, n: int = 9) -> list[int]:
    return [(13 * i + 7 * j) % 250 + 3 for j in range(n)]


def summary(out: RequestOutput) -> list[tuple[Any, ...]]:
    """What a user sees of a finished request, logprobs rounded past float32 noise."""
    rows = []
    for o in out.outputs:
        lps = [sorted((t, round(lp.logprob, 4)) for t, lp in d.items()) for d in o.logprobs or []]
        rows.append((o.index, o.token_ids, o.finish_reason, o.stop_reason, lps))
    plps = [None if d is None else sorted((t, round(lp.logprob, 4)) for t, lp in d.items())
            for d in out.prompt_logprobs or []]
    return [tuple(rows), plps, len(out.prompt_token_ids or [])]


async def workload(llm: AsyncLLM, stop_id: int) -> list[list[tuple[Any, ...]]]:
    """Requests that end in every way while others decode beside them, all at once."""
    requests: list[tuple[list[int], SamplingParams]] = [
        (prompt(0), SamplingParams(temperature=0, max_tokens=1)),
        (prompt(1), SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)),
        (prompt(0), SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id])),  # a stop token
        (prompt(0), SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], min_tokens=8)),
        (prompt(2), SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=12, ignore_eos=True)),
        (prompt(3), SamplingParams(temperature=0.9, top_p=0.9, seed=3, repetition_penalty=1.3,
                                   frequency_penalty=0.5, presence_penalty=0.2, max_tokens=15, ignore_eos=True)),
        (prompt(4), SamplingParams(temperature=0, logprobs=3, max_tokens=9, ignore_eos=True)),
        (prompt(5, 20), SamplingParams(temperature=0, prompt_logprobs=2, max_tokens=6, ignore_eos=True)),
        (prompt(6, MAX_MODEL_LEN - 5), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)),  # context end
        (prompt(7), SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=1)),  # scores the prompt only
    ]
    results: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        ids, params = requests[i]
        results[i] = summary(await llm.generate_one(None, params, prompt_ids=ids))

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    return results


class StepSpy:
    """Records, on the device thread, whether each step followed one in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.follows: list[bool] = []
        self.predecessor_failed = 0
        original = worker_module.Worker._follow
        spy = self

        def follow(worker: worker_module.Worker, ctx: Any, batch: StepBatch, on_launch: Any) -> StepResult:
            spy.follows.append(batch.follows)
            try:
                return original(worker, ctx, batch, on_launch)
            except PredecessorFailed:
                spy.predecessor_failed += 1
                raise

        monkeypatch.setattr(worker_module.Worker, "_follow", follow)


async def test_outputs_are_those_of_steps_taken_in_turn(tiny_source: ModelSource,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine(tiny_source, False) as llm:
        greedy = await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                        prompt_ids=prompt(0))
        stop_id = greedy.outputs[0].token_ids[3]
        want = await workload(llm, stop_id)
    spy = StepSpy(monkeypatch)
    async with engine(tiny_source, True) as llm:
        got = await workload(llm, stop_id)
        stats = llm.stats()
    assert got == want
    assert want[2][0][0][2] == "stop" and len(want[2][0][0][1]) <= 4  # ended by its stop token
    assert want[8][0][0][2] == "length" and len(want[8][0][0][1]) == 5  # ended by the context
    assert sum(spy.follows) > len(spy.follows) / 2, spy.follows  # most steps were scheduled ahead
    assert stats["generation_tokens"] == sum(len(o[1]) for r in got for o in r[0])


async def test_without_async_scheduling_every_step_waits_for_the_one_before(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = StepSpy(monkeypatch)
    async with engine(tiny_source, False) as llm:
        await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                               prompt_ids=prompt(0))
    assert spy.follows and not any(spy.follows)


async def test_no_step_is_scheduled_past_a_request_s_last_token(tiny_source: ModelSource,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spy = StepSpy(monkeypatch)
    async with engine(tiny_source, True) as llm:
        out = await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                     prompt_ids=prompt(0))
        assert len(spy.follows) == 5  # one prompt step and four decodes: the fifth token ends it
        edge = await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                                      prompt_ids=prompt(1, MAX_MODEL_LEN - 3))
        assert len(spy.follows) == 5 + 3
    assert len(out.outputs[0].token_ids) == 5 and len(edge.outputs[0].token_ids) == 3


async def test_a_grammar_or_prompt_logprobs_make_the_next_step_wait(tiny_source: ModelSource,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spy = StepSpy(monkeypatch)
    async with engine(tiny_source, True) as llm:
        await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, ignore_eos=True),
                               prompt_ids=prompt(1, 40))
        first = len(spy.follows)
        out = await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                          structured_outputs={"choice": ["yes", "no"]}),
                                     prompt_ids=prompt(2))
    assert spy.follows[0] is False and spy.follows[1] is False  # the prompt's step had entries to come
    assert not any(spy.follows[first:]), "a grammar's step ran before the token before it was known"
    assert out.outputs[0].finish_reason == "stop"


async def test_an_abort_with_two_steps_in_flight_frees_everything(tiny_source: ModelSource) -> None:
    async with engine(tiny_source, True) as llm:
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        seen = 0
        async for out in llm.generate(None, params, "walk-away", prompt_ids=prompt(3)):
            seen = len(out.outputs[0].token_ids)
            if seen >= 5:
                break  # the owner aborts; steps holding the request are in flight
        done = await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                      prompt_ids=prompt(4))
    assert seen >= 5 and len(done.outputs[0].token_ids) == 4  # no_block_leaks checks the blocks


@pytest.mark.parametrize("fault_step", [3, 6])
async def test_a_step_failing_with_a_step_behind_it_costs_no_request(tiny_source: ModelSource,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     fault_step: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    async with engine(tiny_source, True) as llm:
        want = [(await llm.generate_one(None, params, prompt_ids=prompt(i))).outputs[0].token_ids for i in range(3)]
    spy = StepSpy(monkeypatch)
    monkeypatch.setattr(worker_module.Worker, "__init__", _with_faults(Faults(at_step=fault_step)))
    got: list[Any] = [None] * 3

    async def one(llm: AsyncLLM, i: int) -> None:
        got[i] = (await llm.generate_one(None, params, prompt_ids=prompt(i))).outputs[0].token_ids

    async with engine(tiny_source, True) as llm:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, llm, i)
        snap = llm.engine.snapshot()
    assert got == want
    assert (snap.context_restarts, snap.request_failures) == (1, 0)
    assert spy.predecessor_failed >= 1  # the step behind the failed one failed unrun


def _with_faults(faults: Faults) -> Any:
    original = worker_module.Worker.__init__

    def init(self: worker_module.Worker, source: ModelSource, cfg: EngineConfig, name: str,
             _faults: Faults | None = None) -> None:
        original(self, source, cfg, name, faults)

    return init


async def test_kernel_probes_run_on_a_thread_that_ends_with_them(tiny_source: ModelSource,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP keeps a pool of worker threads for each thread that ran a parallel region, and with
    more of them than CPUs its idle workers stop spinning (2x slower decode steps on 2 cores):
    `resolve` (dtype=auto times kernels) must not run on a pooled thread that outlives it."""
    ran_on: list[threading.Thread] = []
    original = EngineConfig.resolve

    def resolve(self: EngineConfig, *args: Any, **kwargs: Any) -> EngineConfig:
        ran_on.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EngineConfig, "resolve", resolve)
    async with engine(tiny_source, True) as llm:
        await llm.generate_one(None, SamplingParams(temperature=0, max_tokens=2), prompt_ids=prompt(0))
    assert len(ran_on) == 1 and ran_on[0] is not threading.main_thread()
    assert not ran_on[0].is_alive()


async def test_a_failed_step_whose_sequence_was_preempted_meanwhile_is_recomputed(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequences fill the cache; scheduling the step after the one in flight preempts the
    second; the step in flight then fails for its contents (the Context is fine), so its rows run
    again one at a time — but the preempted one lost nothing and is recomputed later, as when no
    step was in flight. Both requests get the tokens they get without the failure."""
    from atomr_trio.executor.sampler import Sampler

    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [prompt(1, 30), prompt(2, 30)]
    settings = {"num_kv_blocks": 4, "block_size": 16}
    async with engine(tiny_source, False, **settings) as llm:
        want = [(await llm.generate_one(None, params, prompt_ids=p)).outputs[0].token_ids for p in prompts]
    original = Sampler.__call__
    failed: list[int] = []

    def fail_once(self: Sampler, logits: Any, rows: list[Any]) -> Any:
        # the step that decodes position 31 of both: scheduling the next one preempts one of them
        if not failed and len(rows) == 2 and all(r.num_output_tokens == 2 for r in rows):
            failed.append(1)
            raise IndexError("a row this step could not sample")
        return original(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", fail_once)
    got: list[Any] = [None, None]
    async with engine(tiny_source, True, **settings) as llm:
        async def one(i: int) -> None:
            got[i] = (await llm.generate_one(None, params, prompt_ids=prompts[i])).outputs[0].token_ids

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(one, i)
        snap = llm.engine.snapshot()
    assert failed and got == want
    assert snap.num_preemptions >= 1 and (snap.request_failures, snap.context_restarts) == (0, 0)
