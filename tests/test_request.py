"""request.py: the owner of one request (the Request actor), on the tiny engine: checked when
made, run once, a deadline that aborts it in the engine, and the prompt preparation both faces
share."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio
from conftest import core_of
from trio.testing import MockClock

from atomr_trio.async_llm import open_engine
from atomr_trio.model_source import ModelSource
from atomr_trio.request import DeadlineExceeded, Request, prepare_prompt, truncate_prompt
from atomr_trio.sampling_params import SamplingParams

PROMPT = [(7 * j) % 250 + 3 for j in range(9)]


def test_prompts_become_checked_token_ids(tiny_source: ModelSource) -> None:
    assert prepare_prompt(tiny_source, PROMPT) == (None, PROMPT)
    assert prepare_prompt(tiny_source, {"prompt_token_ids": PROMPT, "prompt": "t"}) == ("t", PROMPT)
    text, ids = prepare_prompt(tiny_source, "hi", add_special_tokens=False)
    assert text == "hi" and ids == tiny_source.tokenizer.encode("hi", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"1 are not: \[1\] 999"):
        prepare_prompt(tiny_source, [3, 999])
    with pytest.raises(ValueError, match="needs 'prompt'"):
        prepare_prompt(tiny_source, {"text": "hi"})
    assert truncate_prompt([1, 2, 3], 2, 10) == [2, 3] == truncate_prompt([2, 3], 2, 10)  # idempotent
    assert truncate_prompt([1, 2, 3], -1, 2) == [2, 3] and truncate_prompt([1, 2], None, 2) == [1, 2]
    with pytest.raises(ValueError, match="greater than max_model_len"):
        truncate_prompt([1], 11, 10)


async def test_a_request_is_checked_when_made_and_runs_once(tiny_source: ModelSource) -> None:
    async with open_engine(tiny_source, dtype="float32", num_kv_blocks=64, max_model_len=256,
                           torch_threads=1) as engine:
        with pytest.raises(ValueError, match="maximum context length is 256"):
            Request(engine.engine.config, tiny_source, [5] * 256, SamplingParams())
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            Request(engine.engine.config, tiny_source, PROMPT, SamplingParams(truncate_prompt_tokens=300))
        assert engine.stats()["num_requests"] == 0 and core_of(engine).stats.finished == {}
        req = Request(engine.engine.config, tiny_source, PROMPT, SamplingParams(max_tokens=3, truncate_prompt_tokens=4))
        assert req.prompt_ids == PROMPT[-4:]
        out = await req.result(engine.engine)
        assert out.prompt_token_ids == PROMPT[-4:] and len(out.outputs[0].token_ids) == 3
        with pytest.raises(RuntimeError, match="already ran"):
            await req.result(engine.engine)


async def test_a_deadline_aborts_the_request_in_the_engine(tiny_source: ModelSource, mock_clock: MockClock) -> None:
    mock_clock.rate = 1  # real time, plus the jumps below
    async with open_engine(tiny_source, dtype="float32", num_kv_blocks=64, max_model_len=256,
                           torch_threads=1) as engine:
        core = core_of(engine)
        req = Request(engine.engine.config, tiny_source, PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        got = []
        with pytest.raises(DeadlineExceeded):
            async with aclosing(req.outputs(engine.engine, delta=True, deadline=trio.current_time() + 3600)) as outputs:
                async for out in outputs:
                    got.append(out)
                    mock_clock.jump(3600)  # the deadline passes while the request generates
        assert len(got) == 1 and not got[0].finished
        with trio.fail_after(3):
            while engine.stats()["num_requests"]:
                await trio.sleep(0.01)
        assert core.stats.finished == {"abort": 1}
        late = Request(engine.engine.config, tiny_source, PROMPT, SamplingParams(max_tokens=2))
        with pytest.raises(DeadlineExceeded):  # a deadline already past: nothing is left running
            await late.result(engine.engine, deadline=trio.current_time())
