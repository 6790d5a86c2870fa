"""The Placement actor over a fake GPU inventory (no GPU needed): N replicas spread over N GPUs,
each reserving gpu_memory_utilization of its GPU; a deployment that does not fit is refused
whole, with the numbers, and leaves nothing reserved; releasing frees the room; cuda:N pins;
CPU keeps splitting the cores. A refused deployment is a 400 on the admin API, and the tree
shows each Worker's device and the bytes its Context holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from atomr_trio.executor.worker import context_bytes
from atomr_trio.runtime.deployment_spec import DeploymentSpec
from atomr_trio.runtime.gpu_inventory import GiB, GpuInfo, cuda_inventory
from atomr_trio.runtime.placement import Placement, PlacementError, PlacementHandle, PlacementRequest, ReplicaSlot
from atomr_trio.runtime.tree import open_runtime
from atomr_trio.server.app import create_app

TWO_GPUS = [GpuInfo(0, "Fake H100", 80 * GiB, 80 * GiB), GpuInfo(1, "Fake H100", 80 * GiB, 80 * GiB)]
SHARE = int(0.9 * 80 * GiB)


@asynccontextmanager
async def placement(gpus: list[GpuInfo], cpu_threads: int = 8) -> AsyncIterator[PlacementHandle]:
    actor = Placement(cpu_threads=cpu_threads, gpus=gpus)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(actor.run)
        nursery.cancel_scope.cancel()


def request(name: str, replicas: int = 1, device: str = "cuda", utilization: float = 0.9) -> PlacementRequest:
    return PlacementRequest(name, replicas, device, utilization)


async def test_replicas_spread_over_the_gpus_and_later_deployments_go_to_the_least_loaded() -> None:
    async with placement(TWO_GPUS) as places:
        slots = await places.assign(request("big", 2))
        assert slots == [ReplicaSlot("cuda:0", 4, SHARE), ReplicaSlot("cuda:1", 4, SHARE)]
        snap = places.snapshot()
        assert snap.reserved("cuda:0") == snap.reserved("cuda:1") == SHARE
        small = await places.assign(request("small", 1, utilization=0.05))
        assert small == [ReplicaSlot("cuda:0", 8, int(0.05 * 80 * GiB))]  # equal room: the first
        other = await places.assign(request("other", 1, "auto", utilization=0.05))
        assert other[0].device == "cuda:1"  # the least loaded now
        view = places.snapshot().describe()
        assert view["assignments"] == {"big": ["cuda:0", "cuda:1"], "small": ["cuda:0"], "other": ["cuda:1"]}
        devices: Any = view["devices"]
        assert devices[0] == {"device": "cpu", "threads": 8}
        assert devices[1] == {"device": "cuda:0", "name": "Fake H100", "total_bytes": 80 * GiB,
                              "free_bytes": 80 * GiB, "reserved_bytes": SHARE + int(0.05 * 80 * GiB)}


async def test_a_deployment_that_does_not_fit_is_refused_with_the_numbers_and_reserves_nothing() -> None:
    async with placement(TWO_GPUS) as places:
        await places.assign(request("big", 2))
        before = places.snapshot().assignments
        with pytest.raises(PlacementError) as e:
            await places.assign(request("half", 1, utilization=0.5))
        assert str(e.value).startswith(
            "replica 0 needs 40.0 GiB (gpu_memory_utilization 0.5 of cuda:0's 80.0 GiB); "
            "cuda:0 has 8.0 GiB left, cuda:1 has 8.0 GiB left"), e.value
        assert places.snapshot().assignments == before  # refused whole: nothing left behind
        assert places.snapshot().reserved("cuda:0") == SHARE
        places.release("big")
        await trio.testing.wait_all_tasks_blocked()
        assert places.snapshot().reserved("cuda:0") == places.snapshot().reserved("cuda:1") == 0
        assert [s.device for s in await places.assign(request("half", 2, utilization=0.5))] == ["cuda:0", "cuda:1"]


async def test_a_deployment_is_placed_whole_or_not_at_all() -> None:
    uneven = [GpuInfo(0, "Fake", 80 * GiB, 80 * GiB), GpuInfo(1, "Fake", 80 * GiB, 30 * GiB)]
    async with placement(uneven) as places:
        with pytest.raises(PlacementError) as e:  # replica 0 fits on cuda:0, replica 1 nowhere
            await places.assign(request("pair", 2, utilization=0.5))
        assert str(e.value).startswith("replica 1 needs 40.0 GiB (gpu_memory_utilization 0.5 of cuda:1's 80.0 GiB); "
                                       "cuda:0 has 40.0 GiB left, cuda:1 has 30.0 GiB left"), e.value
        assert places.snapshot().assignments == {} and places.snapshot().reserved("cuda:0") == 0


async def test_replicas_share_a_gpu_only_when_they_outnumber_the_gpus() -> None:
    async with placement(TWO_GPUS) as places:
        slots = await places.assign(request("four", 4, utilization=0.4))
        assert [s.device for s in slots] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
        with pytest.raises(PlacementError, match="replica 0 needs 20.0 GiB.*cuda:0 has 16.0 GiB left"):
            await places.assign(request("more", 1, utilization=0.25))


async def test_free_memory_at_inventory_bounds_the_room() -> None:
    busy = [GpuInfo(0, "Fake", 80 * GiB, 50 * GiB)]  # another process holds 30 GiB
    async with placement(busy) as places:
        with pytest.raises(PlacementError, match="cuda:0 has 50.0 GiB left"):
            await places.assign(request("big", 1))
        fits = await places.assign(request("fits", 1, utilization=0.6))
        assert fits == [ReplicaSlot("cuda:0", 8, int(0.6 * 80 * GiB))]


async def test_cuda_n_pins_every_replica_and_an_unknown_gpu_is_refused() -> None:
    async with placement(TWO_GPUS) as places:
        slots = await places.assign(request("pinned", 2, "cuda:1", utilization=0.3))
        assert [s.device for s in slots] == ["cuda:1", "cuda:1"]
        assert places.snapshot().reserved("cuda:0") == 0
        with pytest.raises(PlacementError, match=r"device 'cuda:5': torch sees 2 GPU\(s\): cuda:0, cuda:1"):
            await places.assign(request("nowhere", 1, "cuda:5"))
        with pytest.raises(PlacementError, match="replica 1 needs 24.0 GiB"):
            await places.assign(request("pinned-too", 2, "cuda:1", utilization=0.3))


async def test_cpu_and_auto_without_gpus_split_the_cores_as_before() -> None:
    async with placement([], cpu_threads=4) as places:
        assert await places.assign(request("c", 2, "cpu")) == [ReplicaSlot("cpu", 2)] * 2
        assert await places.assign(request("a", 3, "auto")) == [ReplicaSlot("cpu", 1)] * 3
        with pytest.raises(PlacementError, match="5 replicas need at least 5 CPU cores; this machine has 4"):
            await places.assign(request("many", 5, "auto"))
        with pytest.raises(PlacementError, match=r"device 'cuda': torch .* sees no CUDA GPU \(built with CUDA: "):
            await places.assign(request("g", 1, "cuda"))
        assert places.snapshot().describe()["devices"] == [{"device": "cpu", "threads": 4}]
    async with placement(TWO_GPUS, cpu_threads=4) as places:  # cpu stays cpu beside GPUs
        assert await places.assign(request("c", 2, "cpu")) == [ReplicaSlot("cpu", 2)] * 2
        slots = await places.assign(request("g", 8, "auto", utilization=0.1))  # more replicas than cores: fine on GPUs
        assert all(s.threads == 1 and s.device.startswith("cuda:") for s in slots)


def test_the_inventory_is_empty_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cuda_inventory() == []
    assert Placement(cpu_threads=2).gpus == ()


def test_a_replica_config_takes_the_assigned_device() -> None:
    spec = DeploymentSpec(name="d", device="auto", replicas=2)
    assert spec.engine_config(3, 1, "cuda:1").device == "cuda:1"
    assert spec.engine_config(3, 1) == spec.engine_config(3, 1, None)
    assert spec.engine_config(3, 1).device == "auto"


async def test_a_refused_deployment_is_a_400_with_the_numbers_and_holds_nothing() -> None:
    gpus = [GpuInfo(0, "Fake", 80 * GiB, 80 * GiB)]
    async with open_runtime([], placement=Placement(cpu_threads=2, gpus=gpus)) as runtime:
        client = create_app(runtime).test_client()
        body = {"name": "wide", "device": "cuda", "replicas": 2, "gpu_memory_utilization": 0.9}
        r = await client.post("/admin/deployments", json=body, scope_base={"client": ("127.0.0.1", 50000)})
        assert r.status_code == 400
        err = (await r.get_json())["error"]
        assert err["code"] == "placement_refused", err
        assert "replica 1 needs 72.0 GiB" in err["message"] and "cuda:0 has 8.0 GiB left" in err["message"], err
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.placement.snapshot().assignments == {}


async def test_the_tree_shows_each_workers_device_and_memory(tiny_model_dir: Path) -> None:
    spec = DeploymentSpec(name="tiny", model=str(tiny_model_dir), dtype="float32", max_model_len=128,
                          kv_cache_memory_bytes=4 << 20, replicas=2)
    async with open_runtime([spec], placement=Placement(cpu_threads=2, gpus=[])) as runtime:
        assert runtime.placement.snapshot().describe()["assignments"] == {"tiny": ["cpu", "cpu"]}
        workers = [n for n in _nodes(runtime.tree()) if n["actor"] == "Worker"]
        assert len(workers) == 2
        import conftest

        for node in workers:
            worker = next(w for w in conftest._WORKERS if w.name == node["name"] and w.context is not None)
            assert worker.context is not None
            kv = worker.context.runner.kv_cache
            assert node["device"] == "cpu"
            assert node["memory_bytes"] == context_bytes(worker.context) > kv.nbytes  # the KV cache and weights
            assert node["memory_bytes"] < kv.nbytes + (8 << 20)  # the tiny model's weights are small


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("children", []) for n in _nodes(child))]


def test_context_bytes_counts_each_storage_once_and_opaque_packed_weights_too() -> None:
    from types import SimpleNamespace

    import torch

    from atomr_trio.model import cpu_kernels
    from atomr_trio.model.linear import Linear

    why = cpu_kernels.unavailable("matmul", "onednn", torch.bfloat16)
    if why:  # e.g. an AVX2-only CPU: torch's bf16 reorder raises there
        pytest.skip(f"needs oneDNN's packed bf16 weights: {why}")
    weight = torch.zeros(64, 32, dtype=torch.bfloat16)
    linear = Linear(weight)
    linear.pack()  # oneDNN's blocked copy: an opaque tensor without a readable storage
    assert linear.packed is not None and linear.packed.is_mkldnn
    kv = torch.zeros(2, 2, 4, 16, 8)
    ctx: Any = SimpleNamespace(runner=SimpleNamespace(kv_cache=kv, model=linear))
    assert context_bytes(ctx) == kv.nbytes + 2 * weight.nbytes  # the plain weight and its packed copy
    ctx.runner.model = {"layers": [linear, linear], "views": (weight[:8], kv[0])}  # shared storages: once
    assert context_bytes(ctx) == kv.nbytes + 2 * weight.nbytes
    ctx.runner.model = SimpleNamespace(weight=weight)  # only the package's own objects are walked into
    assert context_bytes(ctx) == kv.nbytes
