"""The request fields of the HTTP API against a live server on tiny random models: every field is
honoured or refused with a 400 naming it, never silently dropped; a model without a chat template
answers chat with a 400; streamed requests are counted in the request metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from serverproc import Server, metric
from test_hf_dir import TINY_CHAT_TEMPLATE, write_tiny_model

from atomr_trio import LLM, RequestError, SamplingParams, open_engine
from atomr_trio.server.protocol import REFUSED
from atomr_trio.text.chat_template import ChatTemplateError

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "qwen2", max_positions=4096)
    return path


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> Path:
    """The tiny model with no chat template."""
    path = tmp_path_factory.mktemp("bare")
    write_tiny_model(path, "qwen2", chat_template=None)
    return path


TEMPLATED = ("{% if greeting is defined %}{{ greeting }}\n{% endif %}{% for d in documents or [] %}"
             "[{{ d['title'] }}]{% endfor %}{% if reasoning_effort %}effort={{ reasoning_effort }}\n{% endif %}"
             + TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory) -> Path:
    """The tiny model with a chat template that reads `greeting`, `documents` and `reasoning_effort`,
    and a tokenizer that starts plain text with a BOS token (<|im_start|>)."""
    from tokenizers import Tokenizer, processors

    path = tmp_path_factory.mktemp("templated")
    write_tiny_model(path, "qwen2", chat_template=TEMPLATED)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir: Path, bare_dir: Path, templated_dir: Path) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("cfg") / "project.toml"
    common = f'dtype = "float32"\nkv_cache_memory_bytes = {16 << 20}'
    cfg.write_text(f"""
[[deployment]]
name = "tiny"
model = "{tiny_dir}"
{common}

[[deployment]]
name = "bare"
model = "{bare_dir}"
{common}

[[deployment]]
name = "counted"
model = "{tiny_dir}"
{common}

[[deployment]]
name = "single"
model = "{tiny_dir}"
max_num_seqs = 1
{common}

[[deployment]]
name = "templated"
model = "{templated_dir}"
{common}

[[deployment]]
name = "deadline"
model = "{tiny_dir}"
request_timeout = 0.5
{common}
""")
    s = Server("--config", str(cfg))
    yield s
    assert s.stop() == 0


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post(http: httpx.Client, route: str, fields: dict, model: str = "tiny", **kw) -> httpx.Response:
    """A small request to /v1/chat/completions ("chat") or /v1/completions with these fields."""
    if route == "chat":
        body = {"model": model, "messages": HI, "max_tokens": 3, **fields}
        return http.post("/v1/chat/completions", json=body, **kw)
    return http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3, **fields}, **kw)


def refused(r: httpx.Response, param: str) -> str:
    """The message of a 400 that names `param`."""
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
    return str(err["message"])


def test_chat_without_a_chat_template_is_a_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "bare", "messages": HI, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "no chat template" in err["message"]
    r = http.post("/tokenize", json={"model": "bare", "messages": HI})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    # plain prompts still work
    r = http.post("/v1/completions", json={"model": "bare", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_library_chat_without_a_chat_template_says_so(bare_dir: Path) -> None:
    with LLM(str(bare_dir), dtype="float32", num_kv_blocks=16) as llm:
        with pytest.raises(ChatTemplateError, match="no chat template.*plain text prompt"):
            llm.chat(HI)
        assert llm.generate("hi", use_tqdm=False)[0].outputs[0].token_ids


def _outcomes(http: httpx.Client, deployment: str) -> dict[str, float]:
    text = http.get("/metrics").text
    names = ("success", "engine_error", "timeout", "shutdown", "disconnected", "rejected", "unavailable")
    counts = {o: metric(text, "atomr:deployment_requests_total", deployment=deployment, outcome=o) for o in names}
    return {o: n for o, n in counts.items() if n}


def _settled(http: httpx.Client, deployment: str, want: dict[str, float]) -> dict[str, float]:
    """The outcome counts once they reach `want` (a stream counts when its body ends), and a moment later."""
    deadline = time.monotonic() + 10
    while _outcomes(http, deployment) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return _outcomes(http, deployment)


async def test_streamed_and_plain_requests_each_count_one_success(server: Server, http: httpx.Client) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        async def one(i: int) -> None:
            body: dict = {"model": "counted", "max_tokens": 5, "stream": i % 2 == 0,
                          "stream_options": {"include_usage": True} if i % 2 == 0 else None}
            if i % 4 < 2:
                path, body["prompt"] = "/v1/completions", ["ab", "cd"] if i % 8 < 4 else "ab"
            else:
                path, body["messages"] = "/v1/chat/completions", HI
            if not body["stream"]:
                r = await c.post(path, json=body)
                assert r.status_code == 200, r.text
                return
            async with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
    assert _settled(http, "counted", {"success": 16}) == {"success": 16}


def test_timed_out_and_abandoned_streams_count_once_with_their_reason(http: httpx.Client) -> None:
    long = {"model": "deadline", "prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2]
    r = http.post("/v1/completions", json={**long, "prompt": [[5, 6], [7, 8]]})  # two prompts, one request
    assert r.status_code == 504
    assert _settled(http, "deadline", {"timeout": 2}) == {"timeout": 2}
    chat = {k: v for k, v in long.items() if k != "prompt"}
    with http.stream("POST", "/v1/chat/completions", json={**chat, "messages": HI, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # leaving the block closed the connection mid-stream
    assert _settled(http, "deadline", {"timeout": 2, "disconnected": 1}) == {"timeout": 2, "disconnected": 1}


def test_validation_errors_name_every_offending_entry(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "logit_bias": {"abc": 1, "7": 500}})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "logit_bias"
    assert "'abc'" in err["message"] and "'7': 500" in err["message"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 999, 6, 300, 7], "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt"
    assert "[1] 999" in err["message"] and "[3] 300" in err["message"] and "2 are not" in err["message"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": list(range(250, 280)), "max_tokens": 2})
    assert r.json()["error"]["message"].endswith("[17] 267 (and 12 more)")  # vocabulary 258: the first 10, a count
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "temperature": 5, "top_p": 7})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "temperature"
    assert "temperature:" in err["message"] and "top_p:" in err["message"]


# Each way to ask for an output constraint, and a check of what comes out (any weights).
STRUCTURED: dict[str, tuple[Any, Callable[[str], bool]]] = {
    "guided_json": ({"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"],
                     "additionalProperties": False}, lambda t: json.loads(t)["k"] in (1, 2)),
    "guided_regex": ("a{1,3}b", lambda t: t in ("ab", "aab", "aaab")),
    "guided_choice": (["yes", "no"], lambda t: t in ("yes", "no")),
    "guided_grammar": ('root ::= "x" | "yz"', lambda t: t in ("x", "yz")),
    "structured_outputs": ({"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    "response_format": ({"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}},
                        lambda t: t in ("true", "false")),
}
MALFORMED = {
    "guided_json": {"type": "nonsense"}, "guided_regex": "((", "guided_choice": [], "guided_grammar": "root ::= nope",
    "structured_outputs": {"regex": "a", "choice": ["a"]}, "response_format": {"type": "yaml"},
}


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_structured_output_fields_are_honoured_or_refused_by_name(http: httpx.Client, route: str) -> None:
    for name, (value, follows) in STRUCTURED.items():
        r = post(http, route, {name: value, "max_tokens": 40, "temperature": 1.0, "n": 3})
        assert r.status_code == 200, r.text
        texts = [c["message"]["content"] if route == "chat" else c["text"] for c in r.json()["choices"]]
        assert all(follows(t) for t in texts), (name, texts)
    for name, value in MALFORMED.items():
        refused(post(http, route, {name: value}), name)
    r = post(http, route, {"guided_regex": "a", "guided_choice": ["a"]})
    assert "one output constraint" in refused(r, "guided_choice")
    # unset (null) or a no-op value: served
    assert post(http, route, dict.fromkeys(STRUCTURED)).status_code == 200
    assert post(http, route, {"response_format": {"type": "text"}}).status_code == 200


def test_the_openai_client_sees_the_refusal(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, extra_body={"guided_regex": "(("})
    assert e.value.body["param"] == "guided_regex"
    assert "does not compile" in e.value.body["message"]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_unimplemented_fields_are_refused_unless_they_ask_for_nothing(http: httpx.Client, route: str) -> None:
    for name in REFUSED:
        refused(post(http, route, {name: ["x"] if name != "include_reasoning" else False}), name)
    noops = {"max_repetition_pattern_size": 0, "include_reasoning": True, "modalities": ["text"],
             "bad_words": [], "allowed_token_ids": None, "logits_processors": [], "mm_processor_kwargs": {}}
    assert post(http, route, noops).status_code == 200
    assert "beam search" in refused(post(http, route, {"use_beam_search": True}), "use_beam_search")
    assert "beam search" in refused(post(http, route, {"length_penalty": 0.8}), "length_penalty")
    assert "best_of must equal n" in refused(post(http, route, {"best_of": 3}), "best_of")
    r = post(http, route, {"best_of": 2, "n": 2, "use_beam_search": False, "length_penalty": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert "not a parameter" in refused(post(http, route, {"temprature": 0.5}), "temprature")  # a typo
    huge = post(http, route, {"k" * 100_000: 1}).json()["error"]  # the name is cut in the answer
    assert huge["param"] == "k" * 100 + "..." and len(huge["message"]) < 200
    routine = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
               "parallel_tool_calls": True, "safety_identifier": "s", "prompt_cache_key": "p"}
    assert post(http, route, routine).status_code == 200


def test_chat_only_refusals(http: httpx.Client) -> None:
    assert "trusted" in refused(post(http, "chat", {"chat_template": "{{ messages }}"}), "chat_template")
    r = post(http, "chat", {"top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert post(http, "chat", {"messages": messages}).status_code == 200  # a tool's result, answered
    assert "use tool_calls" in refused(post(http, "chat", {"messages": [
        *HI, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]}),
        "messages.1.function_call")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused(post(http, "chat", {"tool_choice": "required"}), "tool_choice")  # no tools
    refused(post(http, "chat", {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice")
    refused(post(http, "chat", {"tools": [tool], "tool_choice": "auto"}), "tool_choice")  # auto is not enabled
    refused(post(http, "chat", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}), "tools")
    r = post(http, "chat", {"tools": [tool], "tool_choice": "required", "response_format": {"type": "json_object"}})
    refused(r, "tool_choice")
    # a reply fed back as the openai client returns it (null and empty fields) is fine
    reply = {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None,
             "function_call": None, "tool_calls": None}
    assert post(http, "chat", {"messages": [*HI, reply, {"role": "user", "content": "ok"}]}).status_code == 200
    refused(post(http, "completions", {"suffix": "x"}), "suffix")
    assert "not a parameter" in refused(post(http, "completions", {"messages": HI}), "messages")


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_truncate_prompt_tokens_keeps_the_last_k_tokens(http: httpx.Client, route: str) -> None:
    long = list(range(30, 60))
    if route == "chat":
        fields: dict = {"messages": [{"role": "user", "content": "".join(chr(t) for t in long)}]}
    else:
        fields = {"prompt": long}
    greedy = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    cut = post(http, route, {**fields, **greedy, "truncate_prompt_tokens": 5})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 5
    whole = post(http, route, {**fields, **greedy, "truncate_prompt_tokens": -1}).json()  # -1: the context length
    assert whole["usage"]["prompt_tokens"] > 5
    if route == "completions":  # the same as sending only the last 5 tokens
        same = post(http, route, {**greedy, "prompt": long[-5:]}).json()
        assert cut.json()["choices"][0]["text"] == same["choices"][0]["text"]
    for bad in (0, -2, 5000):
        refused(post(http, route, {**fields, "truncate_prompt_tokens": bad}), "truncate_prompt_tokens")


def test_library_truncate_prompt_tokens(tiny_dir: Path) -> None:
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64) as llm:
        out = llm.generate({"prompt_token_ids": list(range(30, 60))},
                           SamplingParams(truncate_prompt_tokens=4, max_tokens=2), use_tqdm=False)[0]
        assert out.prompt_token_ids == [56, 57, 58, 59]
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            llm.generate("hi", SamplingParams(truncate_prompt_tokens=10**6), use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


async def test_priority_orders_the_waiting_queue(server: Server, http: httpx.Client) -> None:
    """One slot ("single"): a low-priority request queued first still runs after a high-priority one."""
    def waiting() -> float:
        return metric(http.get("/metrics").text, "atomr:num_requests_waiting", model_name="single")

    done: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        async def one(name: str, priority: int) -> None:
            r = await c.post("/v1/completions", json={"model": "single", "prompt": [5, 6], "max_tokens": 4,
                                                      "priority": priority})
            assert r.status_code == 200, r.text
            done.append(name)

        async with trio.open_nursery() as nursery:
            blocker = trio.CancelScope()

            async def hold() -> None:
                with blocker:
                    await c.post("/v1/completions", json={"model": "single", "prompt": [5], "max_tokens": 4000,
                                                          "ignore_eos": True})

            nursery.start_soon(hold)
            for name, priority, queued in (("low", 10, 1), ("high", -10, 2)):
                await trio.sleep(0.1)
                nursery.start_soon(one, name, priority)
                with trio.fail_after(10):
                    while await trio.to_thread.run_sync(waiting) < queued:
                        await trio.sleep(0.02)
            blocker.cancel()  # the blocker's client leaves: its request is aborted and the queue runs
    assert done == ["high", "low"]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_request_id_from_the_body_or_the_header(http: httpx.Client, route: str) -> None:
    prefix = "chatcmpl-" if route == "chat" else "cmpl-"
    r = post(http, route, {"request_id": "trace-41"})
    assert r.json()["id"] == prefix + "trace-41" and r.headers["X-Request-Id"] == "trace-41"
    r = post(http, route, {"request_id": "body-1"}, headers={"X-Request-Id": "hdr-7"})  # the header wins
    assert r.json()["id"] == prefix + "hdr-7" and r.headers["X-Request-Id"] == "hdr-7"
    path, fields = ("/v1/chat/completions", {"messages": HI}) if route == "chat" else ("/v1/completions",
                                                                                      {"prompt": "hi"})
    body = {**fields, "model": "tiny", "max_tokens": 3, "stream": True, "request_id": "s-1"}
    with http.stream("POST", path, json=body) as s:
        assert s.headers["X-Request-Id"] == "s-1"
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert {c["id"] for c in chunks} == {prefix + "s-1"}
    generated = post(http, route, {})
    assert generated.headers["X-Request-Id"] == generated.json()["id"].removeprefix(prefix)
    refused(post(http, route, {"request_id": "x" * 300}), "request_id")
    refused(post(http, route, {"request_id": "a\nb"}), "request_id")
    r = post(http, route, {"temperature": 9}, headers={"X-Request-Id": "bad-9"})  # errors echo it too
    assert r.status_code == 400 and r.headers["X-Request-Id"] == "bad-9"


async def test_requests_reusing_an_id_in_flight_all_finish(server: Server) -> None:
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "request_id": "same"}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        results: list[dict] = []

        async def one(stream: bool) -> None:
            if not stream:
                results.append((await c.post("/v1/completions", json=body)).json())
                return
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            results.append(json.loads(events[-2].removeprefix("data: ")))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i % 2 == 0)
    assert len(results) == 6
    assert all(r["id"] == "cmpl-same" and r["choices"][0]["finish_reason"] == "length" for r in results), results


async def test_library_duplicate_request_id_fails_alone(tiny_dir: Path) -> None:
    """The engine refuses an id already in use; the refused caller must not abort the request holding it."""
    async with open_engine(str(tiny_dir), dtype="float32", num_kv_blocks=64) as engine:
        params = SamplingParams(max_tokens=60, ignore_eos=True)
        first = engine.generate({"prompt_token_ids": [5, 6]}, params, request_id="same")
        async with aclosing(first):
            await first.__anext__()  # the engine holds "same" now
            with pytest.raises(RequestError, match="already in use"):
                await engine.generate_one({"prompt_token_ids": [7, 8]}, params, request_id="same")
            final = None
            async for out in first:
                final = out
        assert final is not None and final.outputs[0].finish_reason == "length"
        assert len(final.outputs[0].token_ids) == 60


def _chunks(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(http: httpx.Client) -> None:
    greedy = {"model": "tiny", "max_tokens": 6, "ignore_eos": True, "n": 2}
    chunks = _chunks(http, "/v1/chat/completions", {**greedy, "messages": HI, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    *steps, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12  # the request's usage, at the end
    prompt = last["usage"]["prompt_tokens"]
    seen = {0: 0, 1: 0}
    for c in steps:
        u, i = c["usage"], c["choices"][0]["index"]
        assert u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"]
        assert u["completion_tokens"] >= seen[i]
        seen[i] = u["completion_tokens"]
    assert seen == {0: 6, 1: 6}

    chunks = _chunks(http, "/v1/completions", {**greedy, "n": 1, "prompt": ["ab", "cde"], "echo": True,
                                               "stream_options": {"continuous_usage_stats": True}})
    assert all(c["choices"] for c in chunks)  # no include_usage: no usage-only chunk at the end
    by_index = {c["choices"][0]["index"]: c["usage"] for c in chunks}
    assert by_index == {0: {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
                        1: {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}}
    plain = _chunks(http, "/v1/completions", {**greedy, "prompt": "ab"})
    assert not any("usage" in c for c in plain)


PREFILL = [*HI, {"role": "assistant", "content": "Hel"}]


def test_continue_final_message_and_add_generation_prompt(http: httpx.Client, tiny_dir: Path) -> None:
    def prompt_tokens(**fields) -> int:
        r = post(http, "chat", fields)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens"])

    # the tiny tokenizer has a token per byte: "<|im_end|>\n" is 2 tokens, "<|im_start|>assistant\n" 11
    closed = prompt_tokens(messages=PREFILL, add_generation_prompt=False)
    assert prompt_tokens(messages=PREFILL, add_generation_prompt=False, continue_final_message=True) == closed - 2
    assert prompt_tokens(messages=PREFILL, continue_final_message=True) == closed - 2  # the default follows
    assert prompt_tokens(messages=PREFILL) == closed + 11
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=16) as llm:
        out = llm.chat(PREFILL, SamplingParams(max_tokens=1), use_tqdm=False, continue_final_message=True)[0]
        assert len(out.prompt_token_ids) == closed - 2 and llm.get_tokenizer().decode(
            out.prompt_token_ids, skip_special_tokens=False).endswith("assistant\nHel")
    r = post(http, "chat", {"messages": PREFILL, "continue_final_message": True, "add_generation_prompt": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_chat_echo_prepends_the_last_message_of_the_replys_role(http: httpx.Client) -> None:
    greedy = {"messages": PREFILL, "continue_final_message": True, "temperature": 0, "max_tokens": 4}
    plain = post(http, "chat", greedy).json()["choices"][0]["message"]
    echoed = post(http, "chat", {**greedy, "echo": True}).json()["choices"][0]["message"]
    assert echoed == {"role": "assistant", "content": "Hel" + plain["content"]}
    chunks = _chunks(http, "/v1/chat/completions", {**greedy, "model": "tiny", "echo": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == echoed["content"]
    # a new assistant turn: the last message (the user's) is not the reply's role, nothing to echo
    new_turn = post(http, "chat", {"messages": HI, "echo": True, "temperature": 0, "max_tokens": 4}).json()
    assert new_turn["choices"][0]["message"]["content"] == post(http, "chat", {
        "messages": HI, "temperature": 0, "max_tokens": 4}).json()["choices"][0]["message"]["content"]
    # no generation prompt after a user message: the reply continues as the user, as in vLLM
    as_user = post(http, "chat", {"messages": HI, "add_generation_prompt": False, "echo": True}).json()
    assert as_user["choices"][0]["message"]["role"] == "user"
    assert as_user["choices"][0]["message"]["content"].startswith("hi")


def test_template_variables_and_special_tokens(http: httpx.Client) -> None:
    def prompt_tokens(route: str, **fields) -> int:
        r = post(http, route, fields, model="templated")
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens"])

    base = prompt_tokens("chat")
    assert prompt_tokens("chat", chat_template_kwargs={"greeting": "hello"}) == base + len("hello\n")
    docs = [{"title": "A", "text": "x"}, {"title": "BC", "text": "y"}]
    assert prompt_tokens("chat", documents=docs) == base + len("[A][BC]")
    assert prompt_tokens("chat", reasoning_effort="low") == base + len("effort=low\n")
    assert prompt_tokens("chat", add_special_tokens=True) == base + 1  # a BOS on top of the template's text
    assert prompt_tokens("completions") == len("hi") + 1  # plain text gets the BOS by default
    assert prompt_tokens("completions", add_special_tokens=False) == len("hi")
    r = post(http, "chat", {"chat_template_kwargs": {"add_generation_prompt": False}}, model="templated")
    assert "top-level" in refused(r, "chat_template_kwargs")


def test_return_tokens_as_token_ids(http: httpx.Client) -> None:
    greedy = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "return_tokens_as_token_ids": True}
    r = post(http, "completions", {**greedy, "logprobs": 2}).json()["choices"][0]
    tokens = r["logprobs"]["tokens"]
    assert len(tokens) == 6 and all(t.startswith("token_id:") for t in tokens)
    assert all(k.startswith("token_id:") for top in r["logprobs"]["top_logprobs"] for k in top)
    ids = [int(t.removeprefix("token_id:")) for t in tokens]
    text = http.post("/detokenize", json={"model": "tiny", "tokens": [t for t in ids if t < 256]}).json()["prompt"]
    assert text == r["text"]  # the ids are the tokens generated (special ones are skipped in the text)
    c = post(http, "chat", {**greedy, "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
    for entry in c["logprobs"]["content"]:
        assert entry["token"].startswith("token_id:") and entry["bytes"] == list(entry["token"].encode())
        assert all(t["token"].startswith("token_id:") for t in entry["top_logprobs"])
    chunks = _chunks(http, "/v1/chat/completions", {**greedy, "model": "tiny", "messages": HI, "logprobs": True})
    streamed = [e["token"] for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == [e["token"] for e in c["logprobs"]["content"]]
    plain = post(http, "completions", {**greedy, "return_tokens_as_token_ids": False, "logprobs": 0}).json()
    assert not plain["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_spaces_between_special_tokens_is_accepted(http: httpx.Client, route: str) -> None:
    """The tiny model's byte-level decoder writes nothing between special tokens either way (the
    joining itself is tested in test_request_tracker.py)."""
    keep = {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "skip_special_tokens": False}
    texts = []
    for spaces in (True, False):
        r = post(http, route, {**keep, "spaces_between_special_tokens": spaces})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        texts.append(choice["message"]["content"] if route == "chat" else choice["text"])
    assert texts[0] == texts[1]


def test_a_request_failing_after_routing_still_echoes_its_id(http: httpx.Client) -> None:
    r = post(http, "chat", {"request_id": "late-1"}, model="bare")  # no chat template: a 400 after routing
    assert r.status_code == 400 and r.headers["X-Request-Id"] == "late-1"
    r = post(http, "completions", {"request_id": "late-2", "truncate_prompt_tokens": 5000})
    assert r.status_code == 400 and r.headers["X-Request-Id"] == "late-2"
