"""Structured outputs on a tiny random model (fast): whatever the weights say, the text follows
the request's constraint — a JSON schema, a regex, a choice, a grammar — for one sample or n,
through preemption; unconstrained rows in the same batch get the tokens they get alone; one
constraint compiles once however many requests share it; and a constraint that cannot compile
is a ValueError naming its parameter, before anything reaches the engine."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import trio
from conftest import core_of
from test_engine_fast import engine_on, prompt, tokens

from atomr_trio import SamplingParams
from atomr_trio.grammar.compiler import GrammarCompiler
from atomr_trio.grammar.spec import StructuredOutputsParams
from atomr_trio.model_source import ModelSource

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"],
                  "additionalProperties": False},
    },
    "required": ["kind", "ok", "tags", "inner"],
    "additionalProperties": False,
}


async def many(engine: Any, prompts: list[Any], params: SamplingParams | list[SamplingParams]) -> list[Any]:
    """The prompts' outputs, run at once (in one batch)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    outs: list[Any] = [None] * len(prompts)

    async def one(i: int) -> None:
        outs[i] = await engine.generate_one(prompts[i], plist[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    return outs


def constrained(max_tokens: int = 120, temperature: float = 1.0, n: int = 1, seed: int | None = None,
                **spec: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed, structured_outputs=spec)


async def test_outputs_follow_a_json_schema_a_regex_a_choice_and_a_grammar(tiny_source: ModelSource) -> None:
    arithmetic = 'root ::= num (op num)* "=" num\nop ::= "+" | "-"\nnum ::= [1-9] | [1-9] [0-9]'
    async with engine_on(tiny_source) as engine:
        outs = await many(engine, [prompt(i) for i in range(8)],
                                     [constrained(json=SCHEMA, seed=i) for i in range(8)])
        for o in outs:
            assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
        regex = r"[a-z]{2,6}-\d{3}"
        outs = await many(engine, [prompt(i) for i in range(4)], constrained(regex=regex, max_tokens=40))
        assert all(re.fullmatch(regex, o.outputs[0].text) for o in outs), [o.outputs[0].text for o in outs]
        out = await engine.generate_one(prompt(1), constrained(choice=["red", "green", "blue sky"], n=4, seed=3))
        assert len(out.outputs) == 4 and all(c.text in {"red", "green", "blue sky"} for c in out.outputs)
        outs = await many(engine, [prompt(i) for i in range(8)],
                          [constrained(grammar=arithmetic, max_tokens=60, seed=i) for i in range(8)])
        for o in outs:
            if o.outputs[0].finish_reason == "stop":  # a random model may write terms until max_tokens
                assert re.fullmatch(r"[1-9][0-9]?([+-][1-9][0-9]?)*=[1-9][0-9]?", o.outputs[0].text)
        assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 1
        # Seeded, and eight of them: unseeded, all four of a random model's objects could still be
        # inside a string at max_tokens (a CI run saw it); seeded, six of these eight close.
        outs = await many(engine, [prompt(i) for i in range(8)],
                          [constrained(json_object=True, max_tokens=200, seed=i) for i in range(8)])
        finished = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
        assert finished and all(isinstance(json.loads(t), dict) for t in finished)


async def test_unconstrained_rows_get_their_own_tokens_beside_constrained_ones(tiny_source: ModelSource) -> None:
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    async with engine_on(tiny_source) as engine:
        alone = [tokens(o) for o in await many(engine, [prompt(i) for i in range(8)], free)]
        mixed_prompts = [prompt(i) for i in range(8)] + [prompt(20 + i) for i in range(8)]
        mixed_params = [free] * 8 + [constrained(json=SCHEMA, temperature=0)] * 8
        outs = await many(engine, mixed_prompts, mixed_params)
        assert [tokens(o) for o in outs[:8]] == alone
        for o in outs[8:]:
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


async def test_one_constraint_compiles_once_for_sixteen_requests(tiny_model_dir: Any) -> None:
    source = ModelSource.open(str(tiny_model_dir))  # a compiler of its own, with an empty cache
    schema = {"type": "object", "properties": {"x": {"enum": ["p", "q"]}}, "required": ["x"]}
    respelled = json.loads(json.dumps(schema, indent=2, sort_keys=True))
    async with engine_on(source) as engine:
        outs = await many(engine, [prompt(i) for i in range(16)],
                                     [constrained(json=schema if i % 2 else respelled, seed=i) for i in range(16)])
    assert all(json.loads(o.outputs[0].text)["x"] in ("p", "q") for o in outs)
    assert source.grammars.compilations == 1


async def test_a_preempted_constrained_sample_resumes_where_its_grammar_was(tiny_source: ModelSource) -> None:
    async with engine_on(tiny_source, num_kv_blocks=10, block_size=16) as engine:
        params = [constrained(json=SCHEMA, seed=i, max_tokens=100) for i in range(8)]
        outs = await many(engine, [prompt(i, n=40) for i in range(8)], params)
        assert core_of(engine).scheduler.num_preemptions > 0
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


@pytest.mark.parametrize(("spec", "says"), [
    ({"regex": "(ab"}, "regex constraint does not compile"),
    ({"grammar": "root ::= undefined_rule"}, "grammar constraint does not compile"),
    ({"json": {"type": "no-such-type"}}, "json constraint does not compile"),
])
async def test_a_constraint_that_does_not_compile_is_a_value_error(tiny_source: ModelSource, spec: dict[str, Any],
                                                                   says: str) -> None:
    async with engine_on(tiny_source) as engine:
        with pytest.raises(ValueError, match=says):
            await engine.generate_one(prompt(), constrained(**spec))
        assert core_of(engine).stats.steps == 0  # nothing reached the engine


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(("spec", "says"), [
    ({}, "give exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "give exactly one of"),
    ({"json": _nested(40)}, "nests deeper than"),
    ({"json": {"enum": list(range(5000))}}, "enum/const values"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"choice": []}, "non-empty list"),
    ({"regex": "x" * 70000}, "characters; at most"),
])
def test_hostile_or_malformed_constraints_are_refused_before_compiling(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        StructuredOutputsParams(**spec)


async def test_a_compilation_past_its_time_limit_is_a_value_error(tiny_source: ModelSource) -> None:
    compiler = GrammarCompiler(tiny_source.tokenizer, tiny_source.config.vocab_size, timeout_s=0.0)
    with pytest.raises(ValueError, match="took longer than"):
        await compiler.compile(StructuredOutputsParams(json=SCHEMA))
