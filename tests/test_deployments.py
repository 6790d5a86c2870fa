"""The full actor tree behind the HTTP API: several deployments from a TOML file, applied and
removed at runtime, data-parallel replicas, metrics, and supervision under injected faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio
from serverproc import Server, metric
from test_hf_dir import write_tiny_model

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = {"prompt": [5, 17, 99, 3, 200, 41], "max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "qwen2")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir: Path) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("cfg") / "project.toml"
    cfg.write_text(f"""
[[deployment]]
name = "smol"
dtype = "float32"
max_model_len = 1024
kv_cache_memory_bytes = {128 << 20}

[[deployment]]
name = "tiny"
model = "{tiny_dir}"
dtype = "float32"
replicas = 2
""")
    s = Server("--config", str(cfg))
    yield s
    assert s.stop() == 0


def test_two_deployments_served_by_name(server: Server) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"smol", "tiny"}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    smol = client.chat.completions.create(model="smol", temperature=0, max_tokens=20, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert smol.choices[0].message.content == "The capital of France is Paris."
    tiny = client.completions.create(model="tiny", prompt=PROMPT["prompt"], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert tiny.usage.completion_tokens == 12 and tiny.model == "tiny"
    assert httpx.get(server.url + "/health").json()["deployments"] == {"smol": "serving", "tiny": "serving"}


async def test_replicas_share_the_load_and_metrics_show_batching(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async def one(i: int) -> None:
            r = await client.post("/v1/completions", json={**PROMPT, "model": "tiny", "max_tokens": 40,
                                                           "prompt": [5 + i, 17, 99]})
            assert r.status_code == 200, r.text

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        text = (await client.get("/metrics")).text
    per_engine = [metric(text, "atomr:generation_tokens_total", model_name="tiny", engine=f"tiny/engine-{i}")
                  for i in range(2)]
    assert all(n > 0 for n in per_engine), per_engine
    assert metric(text, "atomr:engine_multi_sequence_steps_total", model_name="tiny") > 0
    assert metric(text, "atomr:request_success_total", model_name="tiny", finished_reason="length") >= 20
    assert "atomr:time_to_first_token_seconds_bucket" in text and "atomr:kv_cache_usage_perc" in text
    tree = httpx.get(server.url + "/admin/tree").json()
    assert "DeploymentManager" in str(tree) and "tiny/engine-1" in str(tree)


def test_remove_while_streaming_then_apply_again(server: Server, tiny_dir: Path) -> None:
    spec = {"name": "extra", "model": str(tiny_dir), "dtype": "float32"}
    r = httpx.post(server.url + "/admin/deployments", json=spec, timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "serving"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = {**PROMPT, "model": "extra", "max_tokens": 200, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "text" in first
            gone = client.delete("/admin/deployments/extra")
            assert gone.status_code == 202 and gone.json()["state"] == "draining"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in rest[-2]
        deadline = time.monotonic() + 10
        while "extra" in {m["id"] for m in client.get("/v1/models").json()["data"]} or \
                client.get("/admin/deployments/extra").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/completions", json={**PROMPT, "model": "extra"}).status_code == 404
        again = client.post("/admin/deployments", json=spec, timeout=120)
        assert again.json()["state"] == "serving"
        assert client.post("/v1/completions", json={**PROMPT, "model": "extra"}).status_code == 200


def test_context_restart_is_invisible_and_a_failed_deployment_is_isolated(server: Server,
                                                                           tiny_dir: Path) -> None:
    client = httpx.Client(base_url=server.url, timeout=120)
    want = client.post("/v1/completions", json={**PROMPT, "model": "tiny", "max_tokens": 30}).json()
    # The first Context fails at its 5th step: the Worker rebuilds it and recomputes the request.
    flaky = {"name": "flaky", "model": str(tiny_dir), "dtype": "float32", "fail_at_step": 5}
    assert client.post("/admin/deployments", json=flaky).json()["state"] == "serving"
    got = client.post("/v1/completions", json={**PROMPT, "model": "flaky", "max_tokens": 30})
    assert got.status_code == 200
    assert got.json()["choices"][0]["text"] == want["choices"][0]["text"]
    restarts = client.get("/admin/deployments/flaky").json()["replicas"][0]["context_restarts"]
    assert restarts == 1

    # Every Context fails at its 2nd step: past 3 restarts in 60 s the deployment is failed.
    broken = {**flaky, "name": "broken", "fail_at_step": 2, "fail_times": 100}
    assert client.post("/admin/deployments", json=broken).json()["state"] == "serving"
    r = client.post("/v1/completions", json={**PROMPT, "model": "broken"})
    assert r.status_code == 503 and "failed" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={**PROMPT, "model": "broken"})
    assert r.status_code == 503 and "failed" in r.json()["error"]["message"]
    assert client.get("/admin/deployments/broken").json()["state"] == "failed"
    assert client.get("/health").status_code == 503  # not every deployment is serving
    ok = client.post("/v1/completions", json={**PROMPT, "model": "tiny", "max_tokens": 30})
    assert ok.json()["choices"][0]["text"] == want["choices"][0]["text"]
    for name in ("flaky", "broken"):
        client.delete(f"/admin/deployments/{name}")
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


async def test_over_capacity_is_429_with_retry_after_and_failure_is_503(server: Server, tiny_dir: Path) -> None:
    limited = {"name": "limited", "model": str(tiny_dir), "dtype": "float32", "max_num_seqs": 1,
               "serving": {"max_queue": 1, "on_capacity_exhausted": "reject"}}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        assert (await http.post("/admin/deployments", json=limited)).json()["state"] == "serving"
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        outcomes: list[str] = []

        async def one() -> None:
            try:
                r = await client.completions.create(model="limited", prompt=[5, 6, 7], max_tokens=150,
                                                    temperature=0, extra_body={"ignore_eos": True})
                assert r.usage.completion_tokens == 150
                outcomes.append("ok")
            except openai.RateLimitError as e:
                assert int(e.response.headers["Retry-After"]) >= 1
                assert set(e.body) == {"message", "type", "param", "code"}
                outcomes.append("429")

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
                await trio.sleep(0.05)
        assert "429" in outcomes and "ok" in outcomes
        # right after, it serves normally
        r = await client.completions.create(model="limited", prompt=[5, 6, 7], max_tokens=5,
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5

        broken = {"name": "broken2", "model": str(tiny_dir), "dtype": "float32", "fail_at_step": 1,
                  "fail_times": 100}
        assert (await http.post("/admin/deployments", json=broken)).json()["state"] == "serving"
        with pytest.raises(openai.InternalServerError) as e:
            await client.completions.create(model="broken2", prompt=[5, 6, 7], max_tokens=5)
        assert e.value.status_code == 503
        for name in ("limited", "broken2"):
            await http.delete(f"/admin/deployments/{name}")


def test_admin_api_on_loopback_without_keys_and_a_failed_load_is_422(server: Server, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:  # no keys: this loopback client may
        assert client.get("/admin/tree").status_code == 200
        r = client.post("/admin/deployments", json={"name": "missing", "model": str(tmp_path / "nothing-here")})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert "nothing-here" in err["message"] and err["code"] == "deployment_failed"
        assert client.get("/admin/deployments/missing").json()["state"] == "failed"
        assert client.delete("/admin/deployments/missing").status_code == 202
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
