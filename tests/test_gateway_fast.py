"""The gateway in-process (Runtime + Hypercorn on 127.0.0.1, an ephemeral port) over the tiny
model, fast enough for `make test-fast`: a client that disconnects has its request aborted in
the engine, and a request over a deployment's limits gets 429 with Retry-After."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import conftest
import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from atomr_trio.engine.engine_core import EngineCore
from atomr_trio.runtime.deployment import DeploymentHandle
from atomr_trio.runtime.deployment_spec import DeploymentSpec
from atomr_trio.runtime.tree import Runtime, open_runtime
from atomr_trio.server.app import create_app


@asynccontextmanager
async def serving(*specs: DeploymentSpec) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    async with open_runtime(specs) as runtime:
        for spec in specs:
            dep = runtime.manager.get(spec.name)
            assert dep is not None and dep.snapshot().state == "serving"
        hc = HypercornConfig()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, create_app(runtime), hc,
                                                shutdown_trigger=trio.sleep_forever))
            async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
                yield client, runtime
            nursery.cancel_scope.cancel()


def spec(tiny_model_dir: Path, name: str = "tiny", **kw: Any) -> DeploymentSpec:
    return DeploymentSpec(name=name, model=str(tiny_model_dir), dtype="float32", max_model_len=512,
                          kv_cache_memory_bytes=8 << 20, **kw)


def long_body(name: str = "tiny", stream: bool = False, n_prompt: int = 8) -> dict[str, Any]:
    return {"model": name, "prompt": [(5 * j) % 250 + 3 for j in range(n_prompt)], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def engine_of(runtime: Runtime, name: str = "tiny") -> tuple[DeploymentHandle, EngineCore]:
    """The deployment's handle and (for the test to look inside) its first replica's EngineCore."""
    dep = runtime.manager.get(name)
    assert dep is not None
    replica = dep.snapshot().replicas[0].name
    return dep, next(c for c in conftest._ENGINES if c.name == replica and c.state == "serving")


async def wait_until(cond: Any, timeout: float = 3.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_a_client_that_disconnects_has_its_request_aborted(tiny_model_dir: Path) -> None:
    async with serving(spec(tiny_model_dir)) as (client, runtime):
        dep, core = engine_of(runtime)

        def idle() -> bool:
            return core.snapshot().num_requests == 0 and dep.snapshot().admitted == 0

        # a stream whose client stops reading after a few events and closes the connection
        async with client.stream("POST", "/v1/completions", json=long_body(stream=True)) as r:
            assert r.status_code == 200
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break
        await wait_until(idle)
        assert core.stats.finished == {"abort": 1}

        # a non-stream client that gives up while its request generates (as soon as it has begun:
        # a fixed delay could outlast the 400 tokens on a fast machine)
        generated = core.stats.generation_tokens
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/completions", json=long_body()))
            await wait_until(lambda: core.stats.generation_tokens > generated)
            nursery.cancel_scope.cancel()
        await wait_until(idle)
        assert core.stats.finished == {"abort": 2}
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
        steps = core.stats.steps
        await trio.sleep(0.2)
        assert core.stats.steps == steps  # nothing left running for the clients that left


async def test_requests_over_the_deployment_limits_get_429_with_retry_after(tiny_model_dir: Path) -> None:
    from atomr_trio.runtime.deployment_spec import ServingPolicy

    capped = spec(tiny_model_dir, "capped", max_num_seqs=1, serving=ServingPolicy(max_queue=0))
    queued = spec(tiny_model_dir, "queued", max_num_seqs=1,
                  serving=ServingPolicy(max_queue=8, max_queued_prompt_tokens=40))
    async with serving(capped, queued) as (client, runtime):

        def check_429(r: httpx.Response, says: str) -> None:
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and says in err["message"]

        # capacity: max_num_seqs x replicas + max_queue = 1 request in flight
        async with client.stream("POST", "/v1/completions", json=long_body("capped", stream=True)) as held:
            assert held.status_code == 200
            check_429(await client.post("/v1/completions", json=long_body("capped")), "at capacity")
        dep, _ = engine_of(runtime, "capped")
        await wait_until(lambda: dep.snapshot().admitted == 0)  # the stream's client left: its slot is free again
        short = {**long_body("capped"), "max_tokens": 2}
        assert (await client.post("/v1/completions", json=short)).status_code == 200

        # prompt tokens waiting in the engine: one request runs, one 30-token prompt waits
        _, core = engine_of(runtime, "queued")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/completions", json=long_body("queued")))
            await wait_until(lambda: core.num_running == 1)
            nursery.start_soon(partial(client.post, "/v1/completions", json=long_body("queued", n_prompt=30)))
            await wait_until(lambda: core.num_waiting == 1)
            r = await client.post("/v1/completions", json=long_body("queued", n_prompt=20))  # 30 + 20 > 40
            check_429(r, "prompt tokens waiting")
            nursery.cancel_scope.cancel()  # those clients leave; their requests are aborted
        await wait_until(lambda: core.snapshot().num_requests == 0)


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("children", []) for n in _nodes(child))]


async def test_admin_tree_lists_every_actor_with_the_live_requests_under_the_gateway(tiny_model_dir: Path) -> None:
    async with serving(spec(tiny_model_dir)) as (client, runtime):
        dep, _ = engine_of(runtime)

        async def tree() -> dict[str, Any]:
            r = await client.get("/admin/tree")
            assert r.status_code == 200
            return r.json()

        async with client.stream("POST", "/v1/completions", json=long_body(stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
            nodes = _nodes(await tree())
            assert {n["actor"] for n in nodes} == {
                "Runtime", "Metrics", "Placement", "DeploymentManager", "Deployment", "DpCoordinator",
                "EngineCore", "Worker", "Context", "Gateway", "Request"}
            assert all("state" in n or n["actor"] == "Request" for n in nodes)
            assert all("inbox" in n for n in nodes if n["actor"] not in {"Runtime", "Gateway", "Request", "Context"})
            gateway = next(n for n in nodes if n["actor"] == "Gateway")
            assert gateway["state"] == "serving" and gateway["requests"] == 1
            (request,) = gateway["children"]
            assert request["model"] == "tiny" and request["phase"] == "streaming" and request["age_s"] >= 0
        await wait_until(lambda: dep.snapshot().admitted == 0)
        gateway = next(n for n in _nodes(await tree()) if n["actor"] == "Gateway")
        assert gateway["requests"] == 0 and gateway["children"] == []  # off the board once its stream ended
        assert (await client.post("/v1/completions", json={**long_body(), "max_tokens": 2})).status_code == 200
        gateway = next(n for n in _nodes(await tree()) if n["actor"] == "Gateway")
        assert gateway["requests"] == 0  # a non-stream request leaves the board when its handler returns


async def test_tokenize_refuses_a_malformed_conversation_with_400(tiny_model_dir: Path) -> None:
    """The soak found a list of strings as `messages` answered with a 500."""
    async with serving(spec(tiny_model_dir)) as (client, _):
        good = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert good.status_code == 200 and good.json()["count"] > 0
        for messages in (["hi"], [{"role": 5, "content": "x"}], [{"content": "no role"}], [], "hi", [None]):
            r = await client.post("/tokenize", json={"model": "tiny", "messages": messages})
            assert r.status_code == 400, (messages, r.status_code, r.text)
            assert r.json()["error"]["param"].startswith("messages"), r.text
