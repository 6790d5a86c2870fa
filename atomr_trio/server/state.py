"""GatewayState: what the gateway's handlers may reach of the server, stored once on the app.

Invariant: a handler reaches the Runtime (its deployments, metrics, draining flag) and the
gateway's settings only through the one frozen GatewayState that `create_app` put in
`app.extensions` (`gateway_state()`), never through closures or module globals, so every
handler is a plain module-level function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Quart, current_app

from ..runtime.deployment import DeploymentHandle
from ..runtime.deployment_manager import ManagerHandle
from ..runtime.metrics import MetricsHandle
from ..runtime.tree import Runtime
from .protocol import APIError
from .request_board import RequestBoard

_KEY = "atomr_trio"


@dataclass(frozen=True)
class GatewayState:
    runtime: Runtime
    api_keys: tuple[bytes, ...] = ()
    admin_keys: tuple[bytes, ...] = ()
    request_timeout: float | None = None  # seconds, where a deployment sets none
    requests: RequestBoard = field(default_factory=RequestBoard)  # the live Request actors

    @property
    def manager(self) -> ManagerHandle:
        return self.runtime.manager

    @property
    def metrics(self) -> MetricsHandle:
        return self.runtime.metrics

    def deployment(self, name: str) -> DeploymentHandle:
        """The deployment serving `name`, or a 404 in OpenAI's words."""
        dep = self.manager.get(name)
        if dep is None:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", param="model",
                           code="model_not_found")
        return dep

    def tree(self) -> dict[str, Any]:
        """The Runtime's actor tree with the Gateway's node (its live requests) beside its actors."""
        tree = self.runtime.tree()
        tree["children"].append(self.requests.node(self.runtime.is_draining))
        return tree

    def deadline_for(self, dep: DeploymentHandle) -> float:
        """When a request routed now must be over (trio clock; queueing included)."""
        timeout = dep.spec.request_timeout or self.request_timeout
        return trio.current_time() + timeout if timeout else math.inf


def install(app: Quart, state: GatewayState) -> None:
    app.extensions[_KEY] = state


def state_of(app: Quart) -> GatewayState:
    state: GatewayState = app.extensions[_KEY]
    return state


def gateway_state() -> GatewayState:
    """The state of the app serving the current request."""
    return state_of(current_app)
