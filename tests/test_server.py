"""The OpenAI-compatible server, started as `python -m atomr_trio --port 0` and driven with the
official `openai` client (sync and async) and raw HTTP."""

from __future__ import annotations

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
    s = Server("--api-key", KEY, "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(256 << 20))
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
    assert len(many.choices[1].logprobs.token_logprobs) == 5
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
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[tool])
    assert e.value.body["param"] == "tools"
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
