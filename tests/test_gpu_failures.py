"""Failures a GPU raises, on the CPU with the tiny random model: a step that runs out of memory
is retried with a smaller batch (preempted sequences recompute, so greedy requests get exactly
their unfaulted tokens) and fails a request only when one sequence alone, one token at a time,
does not fit; a sticky CUDA error goes straight to the Context rebuild; `classify` tells the
kinds apart from the exception alone; BatchCap lowers and regrows the batch limits."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch
import trio

from atomr_trio import SamplingParams
from atomr_trio.async_llm import AsyncLLM, engine_config
from atomr_trio.engine.batch_cap import RAISE_AFTER, BatchCap
from atomr_trio.engine.block_manager import BlockManager
from atomr_trio.engine.engine_core import EngineCore, EngineHandle
from atomr_trio.engine.scheduler import Scheduler
from atomr_trio.engine.sequence import Sequence
from atomr_trio.executor import worker as worker_module
from atomr_trio.executor.context import Context, InjectedFault
from atomr_trio.executor.failures import classify
from atomr_trio.executor.model_runner import StepBatch, StepResult
from atomr_trio.executor.worker import Faults
from atomr_trio.model_source import ModelSource
from atomr_trio.outputs import RequestError
from atomr_trio.runtime.deployment_spec import DeploymentSpec

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@asynccontextmanager
async def core_on(source: ModelSource, name: str, faults: Faults | None = None,
                  **settings: Any) -> AsyncIterator[tuple[EngineCore, AsyncLLM]]:
    """An EngineCore run directly, with a fault hook and small test settings."""
    settings = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "torch_threads": 1, **settings}
    core = EngineCore(source, engine_config(None, **settings).resolve(source.config), name, faults=faults)
    async with trio.open_nursery() as nursery:
        handle: EngineHandle = await nursery.start(core.run)
        yield core, AsyncLLM(handle, source)
        nursery.cancel_scope.cancel()


def prompt(i: int = 0, n: int = 9) -> dict[str, list[int]]:
    return {"prompt_token_ids": [(13 * i + 7 * j) % 250 + 3 for j in range(n)]}


async def run_all(engine: AsyncLLM, prompts: list[dict[str, list[int]]]) -> list[list[int] | str]:
    """Every prompt at once; each result is its token ids, or its error message."""
    results: list[list[int] | str] = [""] * len(prompts)

    async def one(i: int) -> None:
        try:
            results[i] = list((await engine.generate_one(prompts[i], GREEDY)).outputs[0].token_ids)
        except RequestError as e:
            results[i] = str(e)

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    return results


async def unfaulted(source: ModelSource, prompts: list[dict[str, list[int]]]) -> list[list[int] | str]:
    async with core_on(source, "clean") as (_, engine):
        return [list((await engine.generate_one(p, GREEDY)).outputs[0].token_ids) for p in prompts]


# ---- out of memory -------------------------------------------------------------------------------
async def test_an_oom_preempts_part_of_the_batch_and_every_request_gets_its_unfaulted_tokens(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [prompt(i) for i in range(8)]
    want = await unfaulted(tiny_source, prompts)
    released: list[str] = []
    monkeypatch.setattr(worker_module, "release_cached_memory",
                        lambda device: released.append(threading.current_thread().name))
    steps: list[tuple[int, bool]] = []  # each step's sequences, and whether it ran out of memory
    original = worker_module.Worker._step

    def step(self: worker_module.Worker, ctx: Context, batch: StepBatch, on_launch: Callable[[], None]) -> StepResult:
        try:
            result = original(self, ctx, batch, on_launch)
        except torch.OutOfMemoryError:
            steps.append((len(batch.items), True))
            raise
        steps.append((len(batch.items), False))
        return result

    monkeypatch.setattr(worker_module.Worker, "_step", step)
    faults = Faults(at_step=2, times=2, kind="oom", over_seqs=4)  # the 2nd and 3rd steps of more than 4
    async with core_on(tiny_source, "oom", faults) as (core, engine):
        got = await run_all(engine, prompts)
        snap = core.handle.snapshot()
    assert got == want  # preempted sequences recomputed: exactly the tokens of the unfaulted run
    assert snap.oom_retries >= 1 and snap.num_preemptions > 0  # (64 KV blocks: no preemption without OOM)
    first = next(i for i, (_, oom) in enumerate(steps) if oom)
    assert steps[first + 1][0] <= steps[first][0] // 2  # the retry runs half the batch, not the same one
    assert (snap.request_failures, snap.context_restarts, snap.worker.context_builds) == (0, 0, 1)
    assert released and set(released) == {"oom-device"}  # cached memory freed on the device thread
    assert len(released) == snap.oom_retries


async def test_one_sequence_out_of_memory_retries_smaller_prompt_chunks(tiny_source: ModelSource) -> None:
    want = await unfaulted(tiny_source, [prompt(3)])
    async with core_on(tiny_source, "chunks", Faults(at_step=1, times=3, kind="oom")) as (core, engine):
        got = await run_all(engine, [prompt(3)])  # 9 prompt tokens, then 4, then 2: then 1 at a time fits
        snap = core.handle.snapshot()
    assert got == want
    assert (snap.oom_retries, snap.request_failures, snap.context_restarts) == (3, 0, 0)


async def test_an_oom_that_persists_with_one_sequence_fails_that_request_alone(tiny_source: ModelSource) -> None:
    others = [prompt(i) for i in range(1, 4)]
    want = await unfaulted(tiny_source, others)
    # 9 prompt tokens, 4, 2, 1: still out of memory with one sequence computing one token
    async with core_on(tiny_source, "tight", Faults(at_step=1, times=4, kind="oom")) as (core, engine):
        with pytest.raises(RequestError, match=r"out of memory on cpu with one sequence of 9 tokens "
                                               r"\(1 computed in the step\): injected out of memory"):
            await engine.generate_one(prompt(0), GREEDY)
        snap = core.handle.snapshot()
        assert (snap.oom_retries, snap.request_failures, snap.context_restarts) == (4, 1, 0)
        assert snap.batch_cap == (1, 1)  # the next steps start small ...
        assert await run_all(engine, others) == want  # ... and the engine goes on serving
        snap = core.handle.snapshot()
    assert snap.batch_cap is None or snap.batch_cap[1] > 1  # ... and grows again
    assert (snap.state, snap.worker.context_builds, snap.request_failures) == ("serving", 1, 1)


async def test_the_deployment_spec_passes_its_oom_hook_to_the_worker() -> None:
    spec = DeploymentSpec(name="m", fail_at_step=3, fail_times=2, fail_kind="oom")
    faults = Faults(spec.fail_at_step, spec.fail_times, spec.fail_kind)
    assert faults.context_fault(0) is None  # an OOM breaks no Context
    assert Faults(3, 2).context_fault(1) == 3 and Faults(3, 2).context_fault(2) is None


# ---- sticky CUDA errors ----------------------------------------------------------------------------
async def test_a_sticky_cuda_error_rebuilds_the_context_without_blaming_a_request(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [prompt(i) for i in range(3)]
    want = await unfaulted(tiny_source, prompts)
    builds: list[int] = []
    probes: list[int] = []

    class IllegalAddress(Context):  # the first Context fails once and still looks healthy
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            builds.append(1)
            self.build = len(builds)
            super().__init__(*args, **kwargs)

        def execute(self, batch: StepBatch, on_launch: Callable[[], None] | None = None) -> StepResult:
            if self.build == 1 and self.steps == 4:
                self.steps += 1
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                                   "might be asynchronously reported at some other API call")
            return super().execute(batch, on_launch)

        def healthy(self) -> bool:
            probes.append(1)
            return super().healthy()

    monkeypatch.setattr(worker_module, "Context", IllegalAddress)
    async with core_on(tiny_source, "sticky") as (core, engine):
        got = await run_all(engine, prompts)
        snap = core.handle.snapshot()
    assert got == want  # recomputed from their tokens: the requests saw nothing
    assert (snap.context_restarts, snap.request_failures, snap.oom_retries) == (1, 0, 0)
    assert snap.worker.context_builds == 2
    assert probes == []  # classified from the message: no health probe on a poisoned context


@pytest.mark.parametrize(("error", "kind"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), "oom"),
    (RuntimeError("CUDA error: out of memory"), "oom"),
    (RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"), "device"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "device"),
    (RuntimeError("CUDA error: unspecified launch failure"), "device"),
    (RuntimeError("CUDA error: misaligned address"), "device"),
    (RuntimeError("CUDA error: an illegal instruction was encountered"), "device"),
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "device"),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`"), "device"),
    (InjectedFault("injected fault at step 3"), "device"),
    (RuntimeError("shape '[4, -1]' is invalid for input of size 7"), "unknown"),
    (IndexError("index 70000 is out of bounds for dimension 0 with size 256"), "unknown"),
    (ValueError("grammar rejected every token"), "unknown"),
])
def test_classify_tells_oom_sticky_device_errors_and_the_rest_apart(error: Exception, kind: str) -> None:
    assert classify(error) == kind


def test_an_accelerator_error_is_a_device_failure() -> None:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None:
        pytest.skip("this torch has no AcceleratorError")
    assert classify(accelerator_error("CUDA error: invalid argument")) == "device"
    assert not issubclass(torch.OutOfMemoryError, accelerator_error)  # OOM stays "oom"


# ---- the batch cap ----------------------------------------------------------------------------
def test_the_batch_cap_halves_on_oom_and_grows_back_gradually() -> None:
    cap = BatchCap(max_seqs=64, max_tokens=512)
    assert (cap.num_seqs, cap.num_tokens, cap.capped) == (64, 512, False)
    cap.lower(40, 300)
    assert (cap.num_seqs, cap.num_tokens) == (20, 150)
    cap.lower(1, 1)
    assert (cap.num_seqs, cap.num_tokens) == (1, 1)  # never below one
    sizes: list[tuple[int, int]] = []
    while cap.capped:
        for _ in range(RAISE_AFTER - 1):
            cap.succeeded()
            assert sizes == [] or (cap.num_seqs, cap.num_tokens) == sizes[-1]  # only every RAISE_AFTER steps
        cap.succeeded()
        sizes.append((cap.num_seqs, cap.num_tokens))
    assert sizes[0] == (2, 2) and sizes[-1] == (64, 512)
    assert all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))
    cap.lower(64, 64)  # a new OOM lowers from the failed step's size, not below the cap in force
    assert (cap.num_seqs, cap.num_tokens) == (32, 32)


def test_the_scheduler_admits_no_more_than_the_cap_and_sheds_the_latest() -> None:
    bm = BlockManager(64, 16, False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256)
    tokens = [prompt(i)["prompt_token_ids"] for i in range(6)]
    seqs = [Sequence(f"r{i}", 0, t, len(t), GREEDY) for i, t in enumerate(tokens)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule().scheduled) == 6
    shed = sched.shed(2)
    assert shed == seqs[:1:-1] and sched.running == seqs[:2]  # the most recently admitted go first
    assert sched.num_preemptions == 4 and all(s.num_computed_tokens == 0 for s in shed)
    sched.cap.lower(4, 64)
    out = sched.schedule()
    assert len(sched.running) == 2 and len(out.scheduled) == 2  # the cap (2 sequences) holds
    assert out.num_tokens <= 32 and sched.max_num_seqs == 8
