"""Outcome: how a routed generation request ended, for `deployment_requests{outcome}`.

Invariant: each routed request is counted exactly once (the first reason given wins), whether it
ends in its handler or, for a stream, in its SSE body.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..outputs import RequestOutput
from ..runtime.tree import Runtime


class Outcome:
    def __init__(self, runtime: Runtime, deployment: str) -> None:
        self._runtime = runtime
        self._count: Callable[[str], None] | None = partial(runtime.metrics.count_request, deployment)

    def __call__(self, reason: str) -> None:
        count, self._count = self._count, None
        if count is not None:
            count(reason)

    def ended(self, finals: list[RequestOutput]) -> None:
        """A request that ran to its end: a success, unless the shutdown aborted it."""
        if self.shut_down(finals):
            self("shutdown")
        self("success")

    def shut_down(self, finals: list[RequestOutput]) -> bool:
        """Whether the server's shutdown aborted these outputs."""
        return self._runtime.is_draining and any(o.finish_reason == "abort" for out in finals for o in out.outputs)
