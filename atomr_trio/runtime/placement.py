"""Placement: the actor that owns the device inventory and gives each deployment's replicas
their compute: a device ("cpu" or "cuda:i") and CPU threads each (`ReplicaSlot`).

Invariants:
- The inventory is read once, when the actor is built (gpu_inventory.py; tests pass a fake
  one). Device "cpu", or "auto" where torch sees no GPU: the replicas split the cores between
  them (torch intra-op threads); asking for more replicas than cores fails that deployment
  with a clear reason instead of oversubscribing.
- Device "cuda", or "auto" with GPUs: each replica reserves `gpu_memory_utilization × total`
  bytes of one GPU. A GPU's room is what was free at inventory time (never more than its
  total) minus what placement reserved on it since, for every deployment. Replica k goes to a
  GPU that holds the fewest of this deployment's replicas so far (so N replicas spread over N
  GPUs; two share one only when replicas outnumber GPUs), the one with the most room among
  them that fits it. "cuda:N" puts every replica on GPU N.
- A deployment is placed whole or not at all: if any replica does not fit, the answer is a
  PlacementError naming the numbers and nothing is reserved.
- Every assignment is recorded until the deployment releases it, and the actor publishes a
  `PlacementSnapshot` (devices, reservations, assignments, inbox depth) after every change, so
  the tree shows who holds what. Others hold a `PlacementHandle`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import trio

from ..engine.messages import Board, reply
from .gpu_inventory import GpuInfo, cuda_inventory, gib, no_gpu_reason
from .mailbox import ActorGone, ask, refuse_pending


class PlacementError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlacementRequest:
    """What a deployment asks for: its spec's `device` and `gpu_memory_utilization`."""

    deployment: str
    replicas: int
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    gpu_memory_utilization: float = 0.9


@dataclass(frozen=True)
class ReplicaSlot:
    """One replica's place: its device, its torch threads, the GPU bytes it holds (0 on CPU)."""

    device: str  # "cpu" | "cuda:i"
    threads: int
    reserved_bytes: int = 0


@dataclass(frozen=True)
class Assign:
    request: PlacementRequest
    reply: trio.MemorySendChannel[list[ReplicaSlot] | PlacementError]


@dataclass(frozen=True)
class Release:
    deployment: str


Assignments = Mapping[str, tuple[ReplicaSlot, ...]]


@dataclass(frozen=True)
class PlacementSnapshot:
    state: str  # "created" | "running" | "stopped"
    cpu_threads: int
    gpus: tuple[GpuInfo, ...] = ()
    assignments: Assignments = field(default_factory=lambda: MappingProxyType({}))
    inbox_depth: int = 0

    def reserved(self, device: str) -> int:
        """Bytes reserved on `device` ("cuda:i") across deployments."""
        return _reserved(self.assignments, device)

    def describe(self) -> dict[str, object]:
        gpus = [{"device": g.device, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                 "reserved_bytes": self.reserved(g.device)} for g in self.gpus]
        return {"state": self.state, "inbox": self.inbox_depth,
                "devices": [{"device": "cpu", "threads": self.cpu_threads}, *gpus],
                "assignments": {k: [s.device for s in v] for k, v in self.assignments.items()}}


def _reserved(assignments: Assignments, device: str) -> int:
    return sum(s.reserved_bytes for slots in assignments.values() for s in slots if s.device == device)


class PlacementHandle:
    def __init__(self, send: trio.MemorySendChannel[Assign | Release], board: Board[PlacementSnapshot]) -> None:
        self._send, self._board = send, board

    async def assign(self, request: PlacementRequest) -> list[ReplicaSlot]:
        """A slot (device, threads) for each of the deployment's replicas; raises PlacementError."""
        try:
            answer: list[ReplicaSlot] | PlacementError = await ask(self._send, lambda r: Assign(request, r))
        except ActorGone:
            raise PlacementError("placement has stopped") from None
        if isinstance(answer, PlacementError):
            raise answer
        return answer

    def release(self, deployment: str) -> None:
        """Never blocks (called from cleanup): a release that finds the inbox full or closed is
        moot — the runtime is stopping, or the assignment is replaced on the next assign."""
        try:
            self._send.send_nowait(Release(deployment))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def snapshot(self) -> PlacementSnapshot:
        return replace(self._board.read(), inbox_depth=self._send.statistics().current_buffer_used)


# ---- the rules (pure: the actor applies them to its own state) -------------------------------
def place(request: PlacementRequest, cpu_threads: int, gpus: Sequence[GpuInfo],
          assignments: Assignments) -> list[ReplicaSlot]:
    """The slots for `request` beside `assignments`; raises PlacementError."""
    if request.device == "cpu" or (request.device == "auto" and not gpus):
        return _place_on_cpu(request, cpu_threads)
    return _place_on_gpus(request, max(1, cpu_threads // request.replicas), gpus, assignments)


def _place_on_cpu(request: PlacementRequest, cpu_threads: int) -> list[ReplicaSlot]:
    if request.replicas > cpu_threads:
        raise PlacementError(f"{request.replicas} replicas need at least {request.replicas} CPU cores; "
                             f"this machine has {cpu_threads}")
    return [ReplicaSlot("cpu", cpu_threads // request.replicas)] * request.replicas


def _candidates(request: PlacementRequest, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    if not gpus:
        raise PlacementError(f"device {request.device!r}: {no_gpu_reason()}")
    if request.device in ("auto", "cuda"):
        return list(gpus)
    pinned = [g for g in gpus if g.device == request.device]
    if not pinned:
        raise PlacementError(f"device {request.device!r}: torch sees {len(gpus)} GPU(s): "
                             f"{', '.join(g.device for g in gpus)}")
    return pinned


def _place_on_gpus(request: PlacementRequest, threads: int, gpus: Sequence[GpuInfo],
                   assignments: Assignments) -> list[ReplicaSlot]:
    candidates = _candidates(request, gpus)
    room = {g.device: g.usable_bytes - _reserved(assignments, g.device) for g in candidates}
    held = dict.fromkeys(room, 0)  # this deployment's replicas per GPU
    slots = []
    for k in range(request.replicas):
        fewest = min(held.values())
        order = sorted((g for g in candidates if held[g.device] == fewest), key=lambda g: -room[g.device])
        need = {g.device: int(request.gpu_memory_utilization * g.total_bytes) for g in order}
        gpu = next((g for g in order if need[g.device] <= room[g.device]), None)
        if gpu is None:
            raise PlacementError(_no_room(request, k, order[0], need[order[0].device], room))
        room[gpu.device] -= need[gpu.device]
        held[gpu.device] += 1
        slots.append(ReplicaSlot(gpu.device, threads, need[gpu.device]))
    return slots


def _no_room(request: PlacementRequest, replica: int, gpu: GpuInfo, need: int, room: Mapping[str, int]) -> str:
    left = ", ".join(f"{d} has {gib(max(r, 0))} left" for d, r in room.items())
    return (f"replica {replica} needs {gib(need)} (gpu_memory_utilization {request.gpu_memory_utilization} of "
            f"{gpu.device}'s {gib(gpu.total_bytes)}); {left}: lower gpu_memory_utilization or the replicas, "
            f"or free a GPU")


# ---- the actor ------------------------------------------------------------------------------
class Placement:
    def __init__(self, cpu_threads: int | None = None, gpus: Sequence[GpuInfo] | None = None) -> None:
        self.cpu_threads = cpu_threads or len(os.sched_getaffinity(0))
        self.gpus = tuple(cuda_inventory() if gpus is None else gpus)
        self._assignments: dict[str, tuple[ReplicaSlot, ...]] = {}
        self._send, self._inbox = trio.open_memory_channel[Assign | Release](256)
        self._board = Board(PlacementSnapshot("created", self.cpu_threads, self.gpus))
        self.handle = PlacementHandle(self._send, self._board)

    def _publish(self, state: str = "running") -> None:
        self._board.publish(PlacementSnapshot(state, self.cpu_threads, self.gpus,
                                              MappingProxyType(dict(self._assignments))))

    async def run(self, *, task_status: trio.TaskStatus[PlacementHandle] = trio.TASK_STATUS_IGNORED) -> None:
        self._publish()
        task_status.started(self.handle)
        try:
            async for msg in self._inbox:
                self._handle(msg)
                self._publish()
        finally:
            refuse_pending(self._inbox)
            self._inbox.close()
            self._publish("stopped")

    def _handle(self, msg: Assign | Release) -> None:
        if isinstance(msg, Release):
            self._assignments.pop(msg.deployment, None)
            return
        name = msg.request.deployment
        self._assignments.pop(name, None)  # a deployment applied again replaces its old assignment
        try:
            slots = place(msg.request, self.cpu_threads, self.gpus, self._assignments)
        except PlacementError as e:
            reply(msg.reply, e)
            return
        self._assignments[name] = tuple(slots)
        if not reply(msg.reply, slots):  # the deployment was cancelled while asking
            self._assignments.pop(name, None)
