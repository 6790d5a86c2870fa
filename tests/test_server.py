"""The OpenAI-compatible server, started as `python -m atomr_trio --port 0` and driven with the
official `openai` client (sync and async) and raw HTTP."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import trio
from serverproc import Server

from atomr_trio import LLM, SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-test-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # 16-token blocks: the scoring test's 60-token story fills whole blocks of the prefix cache
    s = Server("--api-key", KEY, "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(256 << 20), "--block-size", "16")
    yield s
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 5  # idle: SIGTERM exits at once


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_chat_equals_the_library_and_counts_the_prompt(client: openai.OpenAI, llm32: LLM) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    want = llm32.chat(QUESTION, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    assert r.choices[0].message.content == want.outputs[0].text == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(llm32.get_tokenizer().encode_chat(QUESTION))
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_n_logprobs_seed_stop(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, seed=11,
                                       max_tokens=12, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, seed=11,
                                           max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stop=["France"])
    assert stopped.choices[0].message.content == "The capital of "
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_prompt_forms(client: openai.OpenAI, server: Server) -> None:
    one = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The sky is"},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert one.choices[0].text == by_ids.choices[0].text and one.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=5,
                                     temperature=0, echo=True, logprobs=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == "The sky is" + one.choices[0].text
    water = many.choices[1].logprobs.token_logprobs  # echo: the prompt's tokens come first, as vLLM
    assert len(water) == len(_ids(server, prompt="Water is")) + 5 and water[0] is None
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == one.choices[0].text


async def test_async_client_32_concurrent_streams(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    texts: dict[int, str] = {}

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i % 5 + 3}."}],
            temperature=0, max_tokens=24, stream=True)
        parts = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        texts[i] = "".join(parts)

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(one, i)
    assert len(texts) == 32 and all(texts.values())
    for i in range(32):  # the same prompt gives the same greedy text whatever the batch
        assert texts[i] == texts[i % 5]
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    multi = [line for line in metrics.splitlines() if line.startswith("atomr:engine_multi_sequence_steps_total{")]
    assert multi and float(multi[0].rsplit(" ", 1)[1]) > 0  # steps really carried several requests


def test_error_contract(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)
    with pytest.raises(openai.BadRequestError) as e:
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[tool], tool_choice="auto")
    assert e.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "string", "pattern": "(("}}}}})
    assert e.value.body["param"] == "response_format" and "does not compile" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-9876543210", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="a" * (5 << 20))
    assert e.value.status_code == 413 and set(e.value.body) == {"message", "type", "param", "code"}
    bad_json = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          content=b"{not json")
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.url + "/v1/models").status_code == 401
    # an API key without --admin-key: the admin API is closed, even to a holder of the key
    for method, path in (("GET", "/admin/tree"), ("POST", "/admin/deployments")):
        r = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {KEY}"},
                          json={"name": "probe", "model": "/etc/hostname"})
        assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"], r.text
    # and it still serves
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    assert r.choices[0].message.content == "The capital of France is Paris."


# ---- scoring: prompt logprobs, echo, max_tokens=0 ---------------------------------------------

STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
         "woodcutter and his three children. Every morning the woodcutter walked into the forest with "
         "his axe, and every evening he came home tired, with a bundle of wood on his back.")


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _ids(server: Server, **what: object) -> list[int]:
    return _post(server, "/tokenize", what).json()["tokens"]


def _worst(token_logprobs: list, ids: list[int], reference) -> float:
    """Largest |ours - transformers'| over the prompt tokens (the first has none: null)."""
    assert len(token_logprobs) == len(ids) and token_logprobs[0] is None
    want = reference.prompt_logprobs(ids)
    return max(abs(token_logprobs[i] - float(want[i - 1, ids[i]])) for i in range(1, len(ids)))


def test_completions_score_a_prompt_as_transformers(server: Server, reference) -> None:
    """As lm-eval scores: echo + logprobs + max_tokens 0, the same again behind a warm prefix
    cache, and with vLLM's prompt_logprobs; float32 logprobs within 1e-4 of transformers'."""
    ids = _ids(server, prompt=STORY)
    assert _post(server, "/v1/completions", {"prompt": STORY, "max_tokens": 1}).status_code == 200  # warm cache
    scoring = {"prompt": STORY, "echo": True, "logprobs": 1, "max_tokens": 0}
    first = _post(server, "/v1/completions", scoring).json()
    choice = first["choices"][0]
    assert choice["text"] == STORY and choice["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 0
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # no logits in cached blocks
    lp = choice["logprobs"]
    assert _worst(lp["token_logprobs"], ids, reference) < 1e-4
    assert lp["top_logprobs"][0] is None
    for tok, own, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert top[tok] == own and 1 <= len(top) <= 2  # the token's own entry and the best one
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    assert "".join(lp["tokens"]) == STORY

    again = _post(server, "/v1/completions", scoring).json()
    assert again["choices"][0]["logprobs"] == lp  # bit for bit

    by_field = _post(server, "/v1/completions", {"prompt": STORY, "prompt_logprobs": 1, "max_tokens": 1,
                                                  "temperature": 0}).json()["choices"][0]
    plp = by_field["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) and by_field["logprobs"] is None
    for i in range(1, len(ids)):
        own = plp[i][str(ids[i])]
        assert abs(own["logprob"] - lp["token_logprobs"][i]) <= 1e-6 and own["decoded_token"] == lp["tokens"][i]
        assert sorted(x["rank"] for x in plp[i].values())[0] == 1 and own["rank"] >= 1

    longer = STORY + " One day he found a golden key under the roots of an old oak."
    longer_ids = _ids(server, prompt=longer)
    shared = next((i for i, (a, b) in enumerate(zip(ids, longer_ids, strict=False)) if a != b), len(ids))
    assert shared > 40
    other = _post(server, "/v1/completions", {**scoring, "prompt": longer}).json()["choices"][0]["logprobs"]
    assert _worst(other["token_logprobs"], longer_ids, reference) < 1e-4
    for i in range(1, shared):
        assert abs(other["token_logprobs"][i] - lp["token_logprobs"][i]) <= 1e-5

    plain = _post(server, "/v1/completions", {"prompt": longer, "max_tokens": 1}).json()
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # scoring filled the cache


def test_completions_logprobs_details(client: openai.OpenAI, server: Server) -> None:
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4
    for tok, own, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {tok: own}  # logprobs 0: the sampled token's own entry
    assert lp.text_offset == [0, *itertools.accumulate(len(t) for t in lp.tokens[:-1])]

    echoed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    n_prompt = len(_ids(server, prompt="The sky is"))
    elp = echoed.choices[0].logprobs
    assert len(elp.tokens) == n_prompt + 4 and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert elp.tokens[n_prompt:] == lp.tokens and elp.token_logprobs[n_prompt:] == lp.token_logprobs
    assert echoed.choices[0].text == "The sky is" + r.choices[0].text

    chunks = [c for c in client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0,
                                                   logprobs=2, echo=True, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == elp.token_logprobs
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == elp.text_offset

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="The sky is", max_tokens=0)  # as vLLM: echo only
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="The sky is", stream=True, extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="The sky is", extra_body={"prompt_logprobs": 21})
    assert e.value.body["param"] == "prompt_logprobs"


def test_chat_prompt_logprobs(server: Server, reference) -> None:
    ids = _ids(server, messages=QUESTION)
    r = _post(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1, "temperature": 0,
                                                "prompt_logprobs": 2}).json()
    plp = r["prompt_logprobs"]
    assert len(plp) == len(ids) == r["usage"]["prompt_tokens"]
    assert _worst([None] + [e[str(t)]["logprob"] for e, t in zip(plp[1:], ids[1:], strict=True)], ids,
                  reference) < 1e-4
    assert all(sorted(x["rank"] for x in e.values())[:2] == [1, 2] for e in plp[1:])
    assert _post(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1}).json().get(
        "prompt_logprobs") is None
