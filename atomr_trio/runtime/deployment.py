"""Deployment: one served model — the actor that supervises its replicas (one EngineCore each)
behind a `DeploymentHandle`; its spec (pydantic, from TOML or the admin API) is in
deployment_spec.py.

Invariants:
- The actor's state moves only through `_move` (rules: deployment_state.next_state); nobody else
  writes it. It publishes a `DeploymentSnapshot` after every change.
- A deployment that fails never takes the server down: its requests get 503 with the reason,
  other deployments keep serving.
- A request is admitted in one message (`handle.admit(jobs)`, after its owner tokenized it):
  state, capacity, waiting prompt tokens and token budget are checked, the DpCoordinator picks
  the least-loaded replica, and the answer is an `Admission` or a DeploymentUnavailable. The
  actor alone counts the tickets out; the `idle` event is set whenever that count is 0.
- Draining (a message, from the DeploymentManager): new requests get 503, the deployment waits
  for its tickets (idle) up to the drain timeout, then stops its replicas and ends.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import trio

from ..engine.engine_config import EngineConfig
from ..engine.engine_core import EngineCore, EngineHandle
from ..engine.messages import Board, reply
from ..executor.device_thread import run_on_own_thread
from ..executor.worker import Faults
from ..model.config import ModelLoadError, UnsupportedModel
from ..model_source import ModelSource
from .deployment_spec import DeploymentSpec
from .deployment_state import DeploymentSnapshot, IllegalTransition, State, next_state
from .dp_coordinator import CoordinatorHandle, DpCoordinator
from .mailbox import ActorGone, ask, refuse_pending
from .metrics import MetricsHandle
from .placement import PlacementError, PlacementHandle, PlacementRequest, ReplicaSlot
from .ticket import Admission, Job, Ticket

log = logging.getLogger(__name__)


class DeploymentUnavailable(Exception):
    """The deployment cannot take this request now (not serving, or over its limits)."""

    def __init__(self, deployment: str, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.deployment, self.status, self.retry_after = deployment, status, retry_after


def _without_paths(text: str) -> str:
    """Client-facing text names no file of the server (the admin API shows the full reason)."""
    return re.sub(r"(?:[A-Za-z]:)?(?:/[\w.+-]+){2,}/?", "<path>", text)


def _first_leaf(e: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _unavailable(name: str, state: str, reason: str | None) -> DeploymentUnavailable:
    why = f": {_without_paths(reason)}" if reason else ""
    return DeploymentUnavailable(name, 503, f"deployment '{name}' is {state}{why}")


# ---- messages -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admit:
    jobs: tuple[Job, ...]
    reply: trio.MemorySendChannel[Admission | DeploymentUnavailable]


@dataclass(frozen=True)
class Drain:
    timeout: float
    reply: trio.MemorySendChannel[DeploymentSnapshot]


@dataclass(frozen=True)
class AbortReplicas:
    reply: trio.MemorySendChannel[None]


Message = Admit | Drain | AbortReplicas
INBOX_SIZE = 256


def _give_back(answer: Admission | DeploymentUnavailable) -> None:
    if isinstance(answer, Admission):
        answer.ticket.release()


class DeploymentHandle:
    """What others hold of a Deployment: its name and spec (fixed for its life), messages, its
    snapshot, and its idle / ended events."""

    def __init__(self, spec: DeploymentSpec, send: trio.MemorySendChannel[Message], board: Board[DeploymentSnapshot],
                 engines: Board[tuple[EngineHandle, ...]], coordinator: CoordinatorHandle,
                 idle: Board[trio.Event], ended: trio.Event) -> None:
        self.spec, self.name = spec, spec.name
        self._send, self._board, self._engines, self._coordinator = send, board, engines, coordinator
        self._idle, self._ended = idle, ended

    def snapshot(self) -> DeploymentSnapshot:
        """The deployment's latest snapshot, with its replicas' and coordinator's latest."""
        return replace(self._board.read(), inbox_depth=self._send.statistics().current_buffer_used,
                       replicas=tuple(e.snapshot() for e in self._engines.read()),
                       coordinator=self._coordinator.snapshot())

    async def admit(self, jobs: Sequence[Job]) -> Admission:
        """Admit a request whose prompts are `jobs` (prompt tokens, n, max_tokens), or raise
        DeploymentUnavailable (503: not serving; 429 with retry_after: over a limit)."""
        try:
            answer = await ask(self._send, lambda r: Admit(tuple(jobs), r), on_lost=_give_back)
        except ActorGone:
            snap = self._board.read()
            raise _unavailable(self.name, snap.state, snap.reason) from None
        if isinstance(answer, DeploymentUnavailable):
            raise answer
        return answer

    def serving_model(self) -> tuple[ModelSource, EngineConfig]:
        """The model this deployment serves and its replicas' engine settings, for a request's
        owner to tokenize and check its prompts with before it asks for admission; raises
        DeploymentUnavailable (503) unless the deployment serves."""
        snap = self._board.read()
        if snap.state != "serving" or snap.source is None or snap.engine_config is None:
            raise _unavailable(self.name, snap.state, snap.reason)
        return snap.source, snap.engine_config

    async def drain(self, timeout: float) -> DeploymentSnapshot:
        """Stop admitting; once the tickets are back (or `timeout` passed) stop the replicas and
        end. Answers at once with the snapshot (state "draining", or "failed" as it was)."""
        try:
            return await ask(self._send, lambda r: Drain(timeout, r))
        except ActorGone:
            return self.snapshot()

    async def abort_all(self) -> None:
        """End every request on every replica now (finish_reason "abort")."""
        try:
            await ask(self._send, AbortReplicas)
        except ActorGone:
            pass

    def is_idle(self) -> bool:
        return self._idle.read().is_set()

    async def wait_idle(self) -> None:
        """Until no ticket is out (at once when none is); an actor that ended is idle."""
        while True:
            event = self._idle.read()
            await event.wait()
            if self._idle.read() is event:
                return

    async def wait_ended(self) -> None:
        await self._ended.wait()


class Deployment:
    """The actor. Its tasks (inbox, release counter, replica supervisor, drain timer) share its
    fields; nothing outside reaches them."""

    def __init__(self, spec: DeploymentSpec, placement: PlacementHandle, metrics: MetricsHandle | None) -> None:
        self.spec, self.name = spec, spec.name
        self._placement, self._metrics = placement, metrics
        self._state: State = "pending"
        self._reason: str | None = None
        self._unsupported = False  # the failure: a model that asks for what is not implemented
        self._refused = False  # the failure: placement found no room (PlacementError)
        self._source: ModelSource | None = None
        self._engine_config: EngineConfig | None = None
        self._replicas: list[EngineHandle] = []
        self._coordinator = DpCoordinator()
        self._admitted = 0
        self._tokens_window: list[tuple[float, int]] = []
        self._draining = False
        self._replica_scope = trio.CancelScope()
        self._settled = trio.Event()  # serving, failed or stopped: an apply may answer
        self._replicas_done = trio.Event()
        self._ended = trio.Event()
        self._send, self._inbox = trio.open_memory_channel[Message](INBOX_SIZE)
        # One message per ticket at most: unbounded by construction, so a release is never lost.
        self._releases, self._released = trio.open_memory_channel[int](math.inf)
        self._board = Board(self._snapshot())
        self._engines: Board[tuple[EngineHandle, ...]] = Board(())
        idle = trio.Event()
        idle.set()
        self._idle = Board(idle)
        self.handle = DeploymentHandle(spec, self._send, self._board, self._engines, self._coordinator.handle,
                                       self._idle, self._ended)

    # ---- state and snapshot -------------------------------------------------------------
    def _move(self, wanted: State, reason: str | None = None) -> None:
        """The one writer of the state; raises IllegalTransition for a move the rules refuse."""
        self._state = next_state(self.name, self._state, wanted, reason)
        if wanted == "failed":
            self._reason = reason
        log.info("deployment %s: %s%s", self.name, wanted, f" ({reason})" if reason else "")
        self._publish()

    def _fail(self, reason: str) -> None:
        if self._state != "failed":  # the first cause stays the reason
            self._move("failed", reason)

    def _snapshot(self) -> DeploymentSnapshot:
        return DeploymentSnapshot(self.name, self._state, self._reason, self.spec, self._source, self._engine_config,
                                  self._admitted, 0, tuple(r.snapshot() for r in self._replicas),
                                  self._coordinator.handle.snapshot(), self._unsupported, self._refused)

    def _publish(self) -> None:
        self._board.publish(self._snapshot())

    def _count(self, delta: int) -> None:
        """Tickets out += delta; the idle event is set exactly while none is out."""
        before, self._admitted = self._admitted, self._admitted + delta
        if before == 0 and self._admitted > 0:
            self._idle.publish(trio.Event())
        elif self._admitted == 0:
            self._idle.read().set()
        self._publish()

    # ---- the actor ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[DeploymentHandle] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, serve until drained or cancelled; reports started once serving or failed. Never
        raises for a model problem: it goes `failed` and answers 503 until removed."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._count_releases)
                nursery.start_soon(self._serve_inbox, nursery)
                nursery.start_soon(self._supervise)
                await self._settled.wait()
                task_status.started(self.handle)
                await self._ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            refuse_pending(self._inbox)
            self._inbox.close()
            self._released.close()
            self._idle.read().set()  # no ticket can come back any more
            self._ended.set()
            self._publish()

    async def _count_releases(self) -> None:
        async for _ in self._released:
            self._count(-1)

    async def _serve_inbox(self, nursery: trio.Nursery) -> None:
        async for msg in self._inbox:
            if isinstance(msg, Admit):
                await self._admit(msg)
            elif isinstance(msg, Drain):
                self._begin_drain(msg, nursery)
            else:
                for engine in self._replicas:
                    await engine.abort_all()
                reply(msg.reply, None)

    async def _supervise(self) -> None:
        """Load the model and run the replicas until they are stopped or one fails."""
        try:
            with self._replica_scope:
                if self._state == "pending":
                    self._move("loading")
                slots = await self._placement.assign(self._placement_request())
                self._source = await trio.to_thread.run_sync(ModelSource.open, self.spec.model)
                async with trio.open_nursery() as nursery:
                    coordinator = await nursery.start(self._coordinator.run)
                    for i, slot in enumerate(slots):
                        await self._start_replica(nursery, coordinator, i, slot)
                    if self._state == "loading":
                        self._move("serving")
                    self._settled.set()
        except Exception as e:  # noqa: BLE001 - a model or engine failure ends this deployment only
            cause = _first_leaf(e)
            first = self._state != "failed"
            self._unsupported = self._unsupported or (first and isinstance(cause, UnsupportedModel))
            self._refused = self._refused or (first and isinstance(cause, PlacementError))
            self._fail(f"{type(cause).__name__}: {cause}")
            # a model that cannot load or be placed says why in its message; other failures keep their trace
            trace = None if isinstance(cause, ModelLoadError | PlacementError) else cause
            log.error("deployment %s failed: %s", self.name, self._reason, exc_info=trace)
        finally:
            self._placement.release(self.name)
            if self._state != "failed":
                self._move("stopped")
            self._settled.set()
            self._replicas_done.set()

    def _placement_request(self) -> PlacementRequest:
        spec = self.spec
        return PlacementRequest(self.name, spec.replicas, spec.device, spec.gpu_memory_utilization)

    async def _start_replica(self, nursery: trio.Nursery, coordinator: CoordinatorHandle, i: int,
                             slot: ReplicaSlot) -> None:
        """Replica i on its slot's device (cuda:i for N replicas over N GPUs) with its threads."""
        assert self._source is not None
        # off the Trio thread: `dtype=auto` may probe the CPU's bf16 kernels (on a thread that ends
        # with the probe: device_thread.run_on_own_thread)
        engine_config = self.spec.engine_config(slot.threads, i, slot.device)
        source_config = self._source.config
        cfg = await run_on_own_thread(lambda: engine_config.resolve(source_config), f"{self.name}-resolve-{i}")
        faults = Faults(self.spec.fail_at_step, self.spec.fail_times, self.spec.fail_kind)
        core = EngineCore(self._source, cfg, f"{self.name}/engine-{i}", self.name, self._metrics,
                          load_sink=coordinator, faults=faults)
        engine = await nursery.start(core.run)
        await coordinator.add(engine)
        self._replicas.append(engine)
        self._engines.publish(tuple(self._replicas))
        self._engine_config = self._engine_config or engine.config  # with the measured KV blocks
        self._publish()

    # ---- draining -----------------------------------------------------------------------
    def _begin_drain(self, msg: Drain, nursery: trio.Nursery) -> None:
        if not self._draining:
            self._draining = True
            try:
                self._move("draining")
            except IllegalTransition as e:  # failed (or stopped) stays as it is, and is removed
                log.info("deployment %s: removed as %s, no drain (%s)", self.name, self._state, e)
            nursery.start_soon(self._finish_drain, msg.timeout)
        reply(msg.reply, self.handle.snapshot())

    async def _finish_drain(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self.handle.wait_idle()
        self._replica_scope.cancel()
        await self._replicas_done.wait()
        self._ended.set()

    # ---- admission ----------------------------------------------------------------------
    async def _admit(self, msg: Admit) -> None:
        try:
            engine = await self._pick(msg.jobs)
        except DeploymentUnavailable as e:
            reply(msg.reply, e)
            return
        ticket = Ticket(self._releases)
        self._count(+1)
        if not reply(msg.reply, Admission(engine, ticket)):  # the caller left before hearing back
            ticket.release()
            self._coordinator.handle.unroute(engine.name)

    async def _pick(self, jobs: tuple[Job, ...]) -> EngineHandle:
        """The replica for a request within every limit; raises DeploymentUnavailable."""
        failure = next((r.snapshot().failure for r in self._replicas if r.snapshot().failure), None)
        if failure and self._state in ("serving", "draining"):
            self._fail(failure)
        if self._state != "serving" or self._source is None:
            raise _unavailable(self.name, self._state, self._reason)
        spec = self.spec
        serving = sum(1 for r in self._replicas if r.snapshot().state == "serving")
        capacity = spec.max_num_seqs * serving + spec.serving.max_queue
        if spec.serving.on_capacity_exhausted == "reject" and self._admitted >= capacity:
            raise DeploymentUnavailable(
                self.name, 429, f"deployment '{self.name}' is at capacity ({self._admitted} requests in flight)", 1.0)
        self._check_queued_prompts(sum(p * n for p, n, _ in jobs))
        tokens = sum(p + (m or 0) * n for p, n, m in jobs)
        self._check_budget(tokens)
        engine = await self._coordinator.handle.pick()
        if engine is None:
            raise DeploymentUnavailable(self.name, 503, f"deployment '{self.name}' has no serving replica")
        if spec.token_budget.tokens_per_minute is not None:
            self._tokens_window.append((time.monotonic(), tokens))
        return engine

    def _check_queued_prompts(self, prompt_tokens: int) -> None:
        policy = self.spec.serving
        limit = policy.max_queued_prompt_tokens
        if limit is None or policy.on_capacity_exhausted != "reject":
            return
        queued = sum(r.snapshot().waiting_prompt_tokens for r in self._replicas)
        if queued and queued + prompt_tokens > limit:
            raise DeploymentUnavailable(
                self.name, 429, f"deployment '{self.name}' has {queued} prompt tokens waiting (limit {limit})", 1.0)

    def _check_budget(self, tokens: int) -> None:
        """429 when `tokens` would overrun the per-minute budget (with on_exceeded "reject");
        the caller charges them once the request is admitted."""
        budget = self.spec.token_budget
        if budget.tokens_per_minute is None:
            return
        now = time.monotonic()
        self._tokens_window = [(t, n) for t, n in self._tokens_window if now - t < 60.0]
        used = sum(n for _, n in self._tokens_window)
        if used + tokens > budget.tokens_per_minute:
            if budget.on_exceeded == "reject":
                wait = 60.0 - (now - self._tokens_window[0][0]) if self._tokens_window else 60.0
                raise DeploymentUnavailable(
                    self.name, 429, f"deployment '{self.name}' token budget ({budget.tokens_per_minute}/min) exceeded",
                    max(1.0, wait))
            log.warning("deployment %s: token budget exceeded (%d/min)", self.name, budget.tokens_per_minute)
