"""What others hold of an EngineCore: the `EngineHandle` (messages to send, the resolved config)
and the `EngineSnapshot` it shows.

Invariant: a handle cannot reach the engine's scheduler, blocks or Worker; reading a snapshot
never blocks and never mutates. The snapshot's `worker` part is the Worker's own latest one, so
it is live even while the engine waits on its Worker (a step, a rebuild).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import trio

from ..executor.worker_handle import WorkerHandle, WorkerSnapshot
from .engine_config import EngineConfig
from .messages import AbortAll, AbortRequest, AddRequest, Board, SeqDelta
from .outbox import Outbox

EngineMessage = AddRequest | AbortRequest | AbortAll


@dataclass(frozen=True)
class EngineSnapshot:
    """What an EngineCore publishes about itself after every change."""

    name: str
    state: str  # "created" | "loading" | "serving" | "restarting" | "failed" | "stopped"
    failure: str | None
    kernels: str
    num_requests: int  # live requests (any sample not finished)
    num_requests_running: int
    num_requests_waiting: int
    waiting_prompt_tokens: int  # prompt tokens not yet computed of the waiting sequences
    inbox_depth: int
    kv_cache_usage: float
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_evictions: int
    num_preemptions: int
    context_restarts: int
    request_failures: int
    oom_retries: int  # steps that ran out of device memory (recovery.py)
    batch_cap: tuple[int, int] | None  # (sequences, tokens) a step may take after an OOM; None: uncapped
    steps: int
    multi_seq_steps: int
    prompt_tokens: int
    generation_tokens: int
    forward_s: float  # model forward seconds, in all
    step_s: float  # engine step seconds (schedule, forward, sampling, bookkeeping)
    forward_share: float
    worker: WorkerSnapshot

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineHandle:
    """Messages to one EngineCore, its resolved config and its latest snapshot."""

    def __init__(self, name: str, config: EngineConfig, send: trio.MemorySendChannel[EngineMessage],
                 board: Board[EngineSnapshot], worker: WorkerHandle) -> None:
        self.name = name
        self.config = config
        self._send = send
        self._board = board
        self._worker = worker

    async def add(self, req: AddRequest) -> None:
        await self._send.send(req)

    async def abort(self, request_id: str, index: int | None = None,
                    outbox: Outbox[SeqDelta] | None = None) -> None:
        """Idempotent; safe after the request finished and after the engine stopped. With `outbox`,
        only the request reporting to that outbox is aborted."""
        try:
            await self._send.send(AbortRequest(request_id, index, outbox))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def abort_all(self) -> None:
        """Ask the engine to end every live request with finish_reason "abort"."""
        try:
            await self._send.send(AbortAll())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def snapshot(self) -> EngineSnapshot:
        snap, worker = self._board.read(), self._worker.snapshot()
        return snap if snap.worker == worker else dataclasses.replace(snap, worker=worker)
