"""Reliability and security of the live server (a tiny random model keeps these fast): auth on
every route, bounded admission, deadlines, disconnects that free everything, graceful shutdown,
and a fuzzer that must never get a 5xx."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from serverproc import Server, metric
from test_hf_dir import write_tiny_model

pytestmark = pytest.mark.slow

KEY, KEY2, ADMIN = "sk-key-one-0001", "sk-key-two-0002", "sk-admin-000003"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-long")
    write_tiny_model(path, "qwen2", max_positions=4096)
    return path


def _config(tmp: Path, tiny_dir: Path) -> Path:
    cfg = tmp / "project.toml"
    cfg.write_text(f"""
[[deployment]]
name = "tiny"
model = "{tiny_dir}"
dtype = "float32"
kv_cache_memory_bytes = {64 << 20}

[[deployment]]
name = "limited"
model = "{tiny_dir}"
dtype = "float32"
max_num_seqs = 8
serving = {{ max_queue = 32, on_capacity_exhausted = "reject" }}

[[deployment]]
name = "slow"
model = "{tiny_dir}"
dtype = "float32"
max_num_seqs = 1
request_timeout = 1.0

[[deployment]]
name = "queued"
model = "{tiny_dir}"
dtype = "float32"
max_num_seqs = 1
serving = {{ max_queued_prompt_tokens = 100 }}
token_budget = {{ tokens_per_minute = 3000 }}

[[deployment]]
name = "small"
model = "{tiny_dir}"
dtype = "float32"
max_model_len = 24
""")
    return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir: Path) -> Iterator[Server]:
    cfg = _config(tmp_path_factory.mktemp("cfg"), tiny_dir)
    s = Server("--config", str(cfg), "--api-key", KEY, "--api-key", KEY2, "--admin-key", ADMIN)
    yield s
    assert s.stop() == 0


def _long(model: str = "tiny", n: int = 2000, stream: bool = False) -> dict:
    return {"model": model, "prompt": [random.randrange(5, 250) for _ in range(8)], "max_tokens": n,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def _near_misses(key: str) -> list[str]:
    return [key + "0", key + key[-1], key[:-1], key[:-1] + ("x" if key[-1] != "x" else "y")]


def test_auth_on_every_route_but_health(server: Server) -> None:
    routes = [
        ("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None), ("GET", "/metrics", None),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "hi"}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": [5, 6]}),
    ]
    admin_routes = [("GET", "/admin/deployments", None), ("GET", "/admin/deployments/tiny", None),
                    ("GET", "/admin/tree", None), ("POST", "/admin/deployments", {"name": ""}),
                    ("DELETE", "/admin/deployments/no-such", None)]
    wrong = {"Authorization": "Bearer " + "x" * len(KEY)}  # same length as the real key
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        for method, path, body in routes + admin_routes:
            for headers in ({}, wrong):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
        # near misses: the real key with a suffix, without its last character, with it changed
        for key, (method, path, body) in ((KEY, routes[0]), (KEY2, routes[3]), (ADMIN, admin_routes[0])):
            for near in _near_misses(key):
                r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {near}"})
                assert r.status_code == 401, (path, near)
            assert c.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for method, path, body in routes:
            for key in (KEY, KEY2):
                r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, (method, path, r.text)
        for method, path, body in admin_routes:
            assert c.request(method, path, json=body, headers=AUTH).status_code == 401  # API key is not admin
            assert c.request(method, path, json=body, headers=ADMIN_AUTH).status_code in (200, 400, 404)


async def test_overload_rejects_the_excess_and_completes_the_rest(server: Server) -> None:
    outcomes: list[int] = []
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                 limits=httpx.Limits(max_connections=250)) as c:
        n = 200  # long enough that the 40 slots are still held while the 200 clients connect
        async def one() -> None:
            r = await c.post("/v1/completions", json=_long("limited", n))
            outcomes.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == n
            else:
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        with trio.fail_after(120):  # nothing hangs
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
        assert outcomes.count(429) > 0 and outcomes.count(200) >= 40
        assert len(outcomes) == 200
        r = await c.post("/v1/completions", json=_long("limited", 8))  # serves normally right after
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


async def test_queued_prompt_tokens_and_token_budget_are_limits(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
        async def waiting() -> float:
            return metric((await c.get("/metrics")).text, "atomr:num_requests_waiting", model_name="queued")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(c.post, "/v1/completions", json=_long("queued", 2000)))  # holds the slot
            await trio.sleep(0.5)
            queued = {**_long("queued", 8), "prompt": list(range(5, 65))}  # 60 prompt tokens
            nursery.start_soon(partial(c.post, "/v1/completions", json=queued))
            with trio.fail_after(10):
                while await waiting() < 1:
                    await trio.sleep(0.05)
            r = await c.post("/v1/completions", json=queued)  # 60 + 60 > 100
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "prompt tokens waiting" in r.json()["error"]["message"]
            short = {**_long("queued", 8), "prompt": list(range(5, 25))}  # 60 + 20 fits
            nursery.start_soon(partial(c.post, "/v1/completions", json=short))
            await trio.sleep(0.3)
            # the per-minute token budget (3,000): this one asks for more than is left
            r = await c.post("/v1/completions", json=_long("queued", 3000))
            assert r.status_code == 429 and "token budget" in r.json()["error"]["message"]
            nursery.cancel_scope.cancel()  # the clients go away; their requests are aborted


async def test_deadline_ends_a_queued_request_at_about_one_second(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
        async with trio.open_nursery() as nursery:
            # A queue on the single slot: each of these ends at its own 1 s deadline.
            for _ in range(3):
                nursery.start_soon(partial(c.post, "/v1/completions", json=_long("slow", 3000)))
            await trio.sleep(0.2)
            t0 = trio.current_time()
            r = await c.post("/v1/completions", json=_long("slow", 3000))
            took = trio.current_time() - t0
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            assert 0.7 < took < 2.5
            t0 = trio.current_time()
            events = []
            async with c.stream("POST", "/v1/completions", json=_long("slow", 3000, stream=True)) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            took = trio.current_time() - t0
            assert events[-1] == "[DONE]" and "request_timeout" in events[-2]
            assert 0.7 < took < 2.5


async def test_disconnects_abort_and_free_everything(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
        def finished(text: str, reason: str) -> float:
            return metric(text, "atomr:request_success_total", model_name="tiny", finished_reason=reason)

        before = (await c.get("/metrics")).text  # the server is shared with the module's other tests
        async def streaming() -> None:
            # leave mid-stream, once the request surely runs in the engine (its first event came)
            async with c.stream("POST", "/v1/completions", json=_long(stream=True)) as s:
                lines = s.aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass
                with trio.move_on_after(random.uniform(0.0, 1.0)):
                    async for _ in lines:
                        pass
            # leaving the block closed the connection mid-stream

        async def blocking() -> None:
            with trio.move_on_after(random.uniform(0.1, 1.5)):
                await c.post("/v1/completions", json=_long())

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(streaming)
                nursery.start_soon(blocking)
        cut = trio.current_time()
        while True:
            text = (await c.get("/metrics")).text
            running = metric(text, "atomr:num_requests_running", model_name="tiny")
            waiting = metric(text, "atomr:num_requests_waiting", model_name="tiny")
            usage = metric(text, "atomr:kv_cache_usage_perc", model_name="tiny")
            if running == waiting == usage == 0:
                break
            assert trio.current_time() - cut < 1.0, (running, waiting, usage)
            await trio.sleep(0.05)
        steps = metric(text, "atomr:engine_steps_total", model_name="tiny")
        await trio.sleep(0.5)
        later = metric((await c.get("/metrics")).text, "atomr:engine_steps_total", model_name="tiny")
        assert later == steps  # the engine stopped stepping
        # every request that reached the engine was aborted (2000 tokens outlast every client): the
        # 16 streams surely, the blocking ones unless a busy machine let one leave before routing
        assert finished(text, "abort") - finished(before, "abort") >= 16
        assert finished(text, "length") == finished(before, "length")


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}


def _deep(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Constraints that cost a compiler time or memory: refused by their size limits (400), or
# compiled within the time limit.
HOSTILE_FORMATS = [
    {"type": "json_schema", "json_schema": {"name": "deep", "schema": _deep(200)}},
    {"type": "json_schema", "json_schema": {"name": "enum", "schema": {"enum": [f"v{i}" for i in range(20000)]}}},
    {"type": "json_schema", "json_schema": {"name": "big", "schema": {"enum": [f"v{i}" for i in range(3000)]}}},
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
    {"type": "json_schema", "json_schema": {"name": "no-schema"}},
    {"type": "json_schema", "json_schema": {"name": "pattern", "schema": {"type": "string", "pattern": "(((("}}},
    {"type": "json_object"}, {"type": "text"}, {"type": "yaml"},
]


def test_fuzzed_bodies_never_get_a_5xx(server: Server) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=20), st.sampled_from([0, 1, -1, 0.5, 2, 1e9, "", "tiny", "small"]))
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
         "content": st.one_of(st.text(max_size=40), anything,
                              st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                              "text": st.text(max_size=10)}), max_size=2))}),
        max_size=3)
    common = {
        "model": st.sampled_from(["small", "small", "small", "nope", 5]),
        "max_tokens": st.one_of(st.none(), st.integers(-5, 40), anything),
        "temperature": st.one_of(st.floats(-1, 3), anything), "top_p": st.one_of(st.floats(-0.5, 1.5), anything),
        "top_k": st.one_of(st.integers(-3, 100), anything), "n": st.one_of(st.integers(-1, 20), anything),
        "stop": st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=70), anything),
        "seed": st.one_of(st.none(), st.integers(-2**70, 2**70)),
        "logit_bias": st.one_of(st.none(), st.dictionaries(st.one_of(st.text(max_size=6),
                                                                     st.integers(-5, 10**6).map(str)),
                                                           st.floats(-200, 200), max_size=5), anything),
        "presence_penalty": st.one_of(st.floats(-3, 3), anything), "min_tokens": st.one_of(st.integers(-2, 50)),
        "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(-5, 10**6), max_size=3), anything),
        "stream": st.booleans(), "logprobs": st.one_of(st.none(), st.booleans(), st.integers(-1, 30)),
        "ignore_eos": st.booleans(), "repetition_penalty": st.one_of(st.floats(-1, 3), anything),
        "tools": st.one_of(st.none(), anything, st.just([WEATHER_TOOL])),
        "tool_choice": st.one_of(st.none(), st.sampled_from(["auto", "required", "none"]), anything,
                                 st.just({"type": "function", "function": {"name": "get_weather"}}),
                                 st.just({"type": "function", "function": {"name": "nope"}})),
        "parallel_tool_calls": st.one_of(st.none(), st.booleans(), anything),
        "response_format": st.one_of(st.none(), anything, st.sampled_from(HOSTILE_FORMATS)),
        "structured_outputs": st.one_of(st.none(), anything, st.fixed_dictionaries(
            {}, optional={"regex": st.text(max_size=12), "choice": st.lists(st.text(max_size=5), max_size=3),
                          "grammar": st.text(max_size=20), "json": anything})),
        "guided_regex": st.one_of(st.none(), st.text(max_size=12)),
        "guided_choice": st.one_of(st.none(), anything),
    }
    prompt = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 400), max_size=30),
                       st.lists(st.text(max_size=10), max_size=3), anything)
    bodies = {
        "/v1/chat/completions": st.fixed_dictionaries({"messages": st.one_of(messages, anything)},
                                                      optional=common),
        "/v1/completions": st.fixed_dictionaries({"prompt": prompt}, optional={**common, "echo": st.booleans()}),
        "/tokenize": st.fixed_dictionaries({}, optional={"model": common["model"], "prompt": prompt,
                                                         "messages": messages}),
        "/detokenize": st.fixed_dictionaries({}, optional={"model": common["model"], "tokens": prompt}),
    }
    client = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    fixed = {**_long("tiny", 12), "prompt": [5, 17, 99, 3]}
    before = client.post("/v1/completions", json=fixed).json()["choices"][0]["text"]
    raw_junk = [b"", b"{", b"[]", b"null", b"[" * 5000 + b"]" * 5000, b'{"model": "small", "prompt": "\xff"}',
                b'{"model": "small", "prompt": "a", "max_tokens": NaN}']
    counts = dict.fromkeys(bodies, 0)
    for path in bodies:
        for raw in raw_junk:
            r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (path, raw[:40], r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    def fuzzer(path: str, strategy: st.SearchStrategy) -> Callable[[], None]:
        @settings(max_examples=2000, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def fuzz(body: dict) -> None:
            counts[path] += 1
            r = client.post(path, content=json.dumps(body, allow_nan=True),
                            headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, r.text
                assert "Traceback" not in err["message"] and "/atomr_trio/" not in err["message"]

        return fuzz

    for path, strategy in bodies.items():
        fuzzer(path, strategy)()
    assert all(n >= 2000 for n in counts.values()), counts
    assert client.get("/health").status_code == 200
    after = client.post("/v1/completions", json=fixed).json()["choices"][0]["text"]
    assert after == before


def test_sigterm_drains_streams_and_exits_zero(tmp_path: Path, tiny_dir: Path) -> None:
    s = Server("--model", str(tiny_dir), "--dtype", "float32", "--shutdown-timeout", "2")
    results: list[list[str]] = []

    async def main() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            started = trio.Event()
            live = [0]

            async def stream() -> None:
                body = {**_long(tiny_dir.name, 3000, stream=True)}
                events: list[str] = []
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2:
                                live[0] += 1
                                if live[0] == 8:
                                    started.set()
                results.append(events)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(stream)
                await started.wait()
                s.proc.send_signal(signal.SIGUSR1)  # logs the live actor tree
                await trio.sleep(0.3)
                assert any("actor tree" in line for line in s.log)
                t0 = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.5)
                with pytest.raises(httpx.TransportError):  # no new connections
                    async with httpx.AsyncClient(base_url=s.url, timeout=5) as fresh:
                        await fresh.get("/health")
            code = await trio.to_thread.run_sync(s.proc.wait, 30)
            assert code == 0
            assert time.monotonic() - t0 < 2 + 2

    trio.run(main)
    assert len(results) == 8
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("abort", "length")
    assert any(json.loads(e[-2])["choices"][0]["finish_reason"] == "abort" for e in results)
