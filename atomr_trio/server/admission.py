"""Admission: a generation request for a deployment — checked, admitted in one message to the
deployment (which picks the replica), run with its deadline, its outcome counted.

Invariants:
- The admission ticket is released exactly once, by one mechanism: `Admitted.admit` enters it
  (a context manager) into an ExitStack held for as long as the handler runs, and a handler
  that answers with a stream hands the stack over (`Admitted.stream`) to the stream's body,
  which then releases it (sse.SSEBody).
- Requests are made (and so checked) here, with the model and settings the deployment serves,
  before the deployment is asked to admit them: a request refused with a 400 costs no capacity
  and no token budget.
- A handler cancelled (its client went away) counts its request "disconnected".
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from quart import Response

from ..outputs import RequestError, RequestOutput
from ..request import DeadlineExceeded, Request, truncate_prompt
from ..runtime.deployment import DeploymentHandle
from ..sampling_params import SamplingParams
from .errors import bad_request, engine_failed, timeout_error
from .outcome import Outcome
from .protocol import APIError, StreamOptions
from .request_board import RequestBoard
from .sse import Part, sse_events, sse_response
from .state import gateway_state

if TYPE_CHECKING:
    from ..engine.engine_config import EngineConfig
    from ..engine.engine_core import EngineHandle
    from ..model_source import ModelSource

_engine_seq = itertools.count()  # makes engine request ids unique when clients reuse theirs


@dataclass
class Admitted:
    dep: DeploymentHandle
    source: ModelSource
    config: EngineConfig  # the replicas' settings
    deadline: float  # trio clock
    outcome: Outcome
    held: ExitStack  # releases the admission ticket
    board: RequestBoard  # where the request shows in /admin/tree
    key: int  # its entry on the board
    engine: EngineHandle | None = None  # the replica, once admitted

    @property
    def max_model_len(self) -> int:
        max_len = self.config.max_model_len
        assert max_len is not None
        return max_len

    def truncated(self, ids: list[int], k: int | None) -> list[int]:
        try:
            return truncate_prompt(ids, k, self.max_model_len)
        except ValueError as e:
            raise APIError(400, str(e), param="truncate_prompt_tokens") from None

    def max_tokens(self, prompt_tokens: int, asked: int | None) -> int | None:
        """OpenAI's default max_tokens: what the context has left (None for a prompt that leaves
        nothing: the request's check refuses it)."""
        if asked is not None:
            return asked
        return self.max_model_len - prompt_tokens if prompt_tokens < self.max_model_len else None

    def request(self, rid: str, ids: list[int], params: SamplingParams, text: str | None = None) -> Request:
        """A checked request (a 400 when refused) under a unique engine id."""
        try:
            return Request(self.config, self.source, ids, params, text=text,
                           request_id=f"{rid}-{next(_engine_seq):x}", completion_must_fit=True)
        except ValueError as e:
            raise bad_request(e) from None

    async def admit(self, requests: Sequence[Request]) -> EngineHandle:
        """Admit the requests in one message to the deployment: within its limits (429 past
        them, 503 when it cannot serve) it charges their tokens and picks the replica."""
        for r in requests:  # an output constraint compiles first: a bad one is a 400 and costs nothing
            try:
                await r.prepare()
            except ValueError as e:
                spec = r.params.structured_outputs
                raise bad_request(e, getattr(spec, "param", "structured_outputs")) from None
        admission = await self.dep.admit([(len(r.prompt_ids), r.params.n, r.params.max_tokens) for r in requests])
        self.held.enter_context(admission.ticket)
        self.board.mark(self.key, "admitted")
        self.engine = admission.engine
        return admission.engine

    async def finish(self, request: Request) -> RequestOutput:
        """Run one request to its end; the deadline covers queueing and generation."""
        try:
            out = await request.result(self._engine(), self.deadline)
        except RequestError as e:
            self.outcome("engine_error")
            raise engine_failed(e) from None
        except DeadlineExceeded:
            self.outcome("timeout")
            raise timeout_error() from None
        if self.outcome.shut_down([out]):
            self.outcome("shutdown")
            raise APIError(503, "the server shut down before the request finished", "service_unavailable")
        return out

    def stream(self, rid: str, kind: str, parts: Sequence[Part], options: StreamOptions | None) -> Response:
        """Answer with a stream of the parts' events; the stream takes over the ticket."""
        events = sse_events(rid, kind, self.dep.name, self._engine(), parts, self.outcome, self.deadline, options)
        self.board.mark(self.key, "streaming")
        return sse_response(events, self.held.pop_all(), self.outcome)

    def _engine(self) -> EngineHandle:
        assert self.engine is not None, "admit the requests first"
        return self.engine


@asynccontextmanager
async def admitted(model: str) -> AsyncIterator[Admitted]:
    """A generation request for `model` (its deadline starts now): the handler makes its
    requests and admits them (`Admitted.admit`); the admission ticket is held until the handler
    is done, unless a stream took it over."""
    state = gateway_state()
    dep = state.deployment(model)
    deadline = state.deadline_for(dep)
    source, config = dep.serving_model()
    outcome = Outcome(state.runtime, dep.name)
    with ExitStack() as held:
        key = state.requests.add(dep.name)
        held.callback(state.requests.remove, key)  # off the board when the ticket is released
        try:
            yield Admitted(dep, source, config, deadline, outcome, held, state.requests, key)
        except BaseException as e:
            if isinstance(e, trio.Cancelled) or (
                    isinstance(e, BaseExceptionGroup) and e.subgroup(trio.Cancelled) is not None):
                outcome("disconnected")  # the client went away
            raise
