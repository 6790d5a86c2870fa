"""Structured outputs and tool calls through the server on the default model, driven with the
official `openai` client: parsed pydantic objects, JSON schemas that validate, regexes, choices
and a grammar that match, forced tool calls that parse into declared tools with valid
arguments (streamed the same as not), and a tool's result answered in words."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serverproc import Server

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
T = TypeVar("T")


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    s = Server("--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0) as c:
            yield c
    finally:
        assert s.stop() == 0


def in_parallel(fn: Callable[[int], T], n: int) -> list[T]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(fn, range(n)))


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=30)
    role: Literal["engineer", "teacher", "artist", "doctor"]


SUBJECTS = ["a young painter from Lyon", "an old doctor in Rome", "a teacher in Oslo", "a chef from Lima",
            "an engineer in Pune", "a poet in Dublin", "a nurse in Quito", "a pilot from Cairo",
            "a farmer near Kyoto", "a student in Austin", "a baker in Vienna", "a judge from Accra",
            "a sailor in Perth", "a writer in Prague", "a dancer from Havana", "a coder in Tallinn",
            "a miner near Denver", "a singer in Seoul", "a potter in Fez", "a monk in Lhasa"]


def test_parse_returns_a_pydantic_object_for_twenty_prompts(client: openai.OpenAI) -> None:
    def one(i: int) -> Person | None:
        r = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": f"Describe {SUBJECTS[i]} as a person record."}],
            response_format=Person, max_tokens=200, temperature=0.7, seed=i)
        return r.choices[0].message.parsed

    parsed = in_parallel(one, 20)
    assert all(isinstance(p, Person) for p in parsed), parsed
    assert len({p.name for p in parsed if p}) > 1  # the prompts shape the answers


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer",
     "minimum": 0, "maximum": 99}}, "required": ["color", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
     "minItems": 1, "maxItems": 4}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "admin": {"type": "boolean"}}, "required": ["name", "admin"],
        "additionalProperties": False}, "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}},
     "required": ["user", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40},
     "confidence": {"type": "number", "minimum": 0, "maximum": 1}, "sources": {"type": "array", "maxItems": 2,
     "items": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20}}, "required": ["title"],
               "additionalProperties": False}}}, "required": ["answer", "sources"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
     "maximum": 599}, "detail": {"type": ["string", "null"], "maxLength": 30}},
     "required": ["status", "code", "detail"], "additionalProperties": False},
]


def test_json_schema_outputs_validate_fifty_of_fifty(client: openai.OpenAI) -> None:
    def one(i: int) -> tuple[str, str | None]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request {i}: answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i % 5}", "schema": schema,
                                                                     "strict": True}},
            max_tokens=300, temperature=0.7, seed=i)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    results = in_parallel(one, 50)
    for i, (text, reason) in enumerate(results):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])


def test_regex_choice_grammar_and_json_object_always_match(client: openai.OpenAI) -> None:
    def completion(extra: dict[str, Any], prompt: str, i: int) -> str:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0.8, seed=i,
                                      extra_body=extra)
        return r.choices[0].text

    regex = r"\d{3}-\d{4}"
    phones = in_parallel(lambda i: completion({"structured_outputs": {"regex": regex}}, "Call me at", i), 8)
    assert all(re.fullmatch(regex, p) for p in phones), phones
    moods = in_parallel(lambda i: completion({"guided_choice": ["happy", "sad", "calm"]}, "I feel", i), 8)
    assert set(moods) <= {"happy", "sad", "calm"}
    grammar = 'root ::= num " " op " " num " = " num\nop ::= "+" | "-" | "*"\nnum ::= [0-9] | [1-9] [0-9]'
    sums = in_parallel(lambda i: completion({"structured_outputs": {"grammar": grammar}}, "A sum:", i), 8)
    assert all(re.fullmatch(r"\d{1,2} [-+*] \d{1,2} = \d{1,2}", s) for s in sums), sums

    def json_object(i: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Reply with a JSON object holding the name and the "
                                                              f"color of fruit number {i}."}],
            response_format={"type": "json_object"}, max_tokens=400, temperature=0.3, seed=i)
        return r.choices[0].message.content or ""

    assert all(isinstance(json.loads(t), dict) for t in in_parallel(json_object, 8))


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                    "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}, "required": ["a", "b"],
                    "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["What's the weather in Paris?", "Add 2 and 40.", "Is it raining in Tokyo?", "What is 7 plus 8?"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_parse_into_declared_tools_with_valid_arguments(client: openai.OpenAI, choice: Any) -> None:
    def one(i: int) -> Any:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ASKS[i % len(ASKS)]}], tools=TOOLS,
            tool_choice=choice, max_tokens=200, temperature=0.7, seed=i, parallel_tool_calls=False)
        return r.choices[0]

    for c in in_parallel(one, 20):
        assert c.message.tool_calls, c.message.content
        assert c.finish_reason == "tool_calls"
        assert len(c.message.tool_calls) == 1  # parallel_tool_calls=False
        for call in c.message.tool_calls:
            assert call.id and call.type == "function" and call.function.name in SCHEMA_OF
            if isinstance(choice, dict):
                assert call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_to_the_unstreamed_ones(client: openai.OpenAI, choice: Any) -> None:
    args: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": ASKS[0]}], "tools": TOOLS,
                            "tool_choice": choice, "max_tokens": 200, "temperature": 0.7, "seed": 11}
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                if d.id:
                    assert not call["id"], "an id is sent once, with the call's first delta"
                    call["id"] = d.id
                if d.function and d.function.name:
                    call["name"] += d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
    assert whole and [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (w.function.name, json.loads(w.function.arguments)) for w in whole]
    assert all(c["id"] for c in calls.values()) and reasons[-1] == "tool_calls"


def test_a_tool_result_gets_an_answer_in_words(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.message.content and c.message.content.strip() and not c.message.tool_calls
    assert c.finish_reason in ("stop", "length")


def test_auto_tool_choice_reads_calls_or_keeps_the_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASKS[1]}], tools=TOOLS,
                                       max_tokens=120, temperature=0)
    c = r.choices[0]
    if c.message.tool_calls:  # the model may call a tool or answer; either way the answer is well formed
        assert c.finish_reason == "tool_calls"
        for call in c.message.tool_calls:
            assert call.function.name in SCHEMA_OF and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert c.message.content is not None and c.finish_reason in ("stop", "length")
