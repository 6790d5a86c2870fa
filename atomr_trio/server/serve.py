"""serve: run the Runtime (deployments, metrics) and the Gateway (Hypercorn) as sibling tasks in
one nursery we own.

Invariant: the first SIGINT/SIGTERM stops accepting and lets in-flight requests finish (up to
`shutdown_timeout`, waiting on the deployments' idle events); a second signal cancels everything
at once. SIGUSR1 logs the actor tree.
Leaving the nursery stops every engine. A server whose every deployment failed at start raises
`StartupFailed` instead of listening (the CLI exits non-zero with the causes); deployments that
fail later, or are added later, leave the server up for the others.
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Any, Literal

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from pydantic import BaseModel, ConfigDict, Field

from ..runtime.deployment_spec import DeploymentSpec
from ..runtime.tree import open_runtime
from .app import create_app
from .state import GatewayState, state_of

log = logging.getLogger("atomr_trio")
ABORT_GRACE_S = 2.0  # after the shutdown timeout's abort: for the aborted requests' handlers to end
WRITE_GRACE_S = 1.0  # after idle: for Hypercorn to write the last responses and return


class StartupFailed(RuntimeError):
    """Every deployment failed while the server started: there is nothing to serve."""


class ServerSettings(BaseModel):
    """The server's settings; `python -m atomr_trio` builds them from its flags (cli.py)."""

    model_config = ConfigDict(extra="forbid")
    deployments: list[DeploymentSpec] = Field(
        default_factory=lambda: [DeploymentSpec(name="default")],
        description="the models to serve (default: one deployment of the default model)")
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind; 0 picks a free one")
    api_keys: list[str] = Field(
        default_factory=list, description="require 'Authorization: Bearer KEY' on every route but /health and "
                                          "/admin/* (repeatable; also $ATOMR_API_KEY, comma-separated)")
    admin_keys: list[str] = Field(
        default_factory=list, description="the keys that open /admin/* (repeatable; also $ATOMR_ADMIN_KEY). "
                                          "Without one, /admin/* is closed (403) when API keys are set, and "
                                          "answers loopback clients only when no key is set")
    request_timeout: float | None = Field(
        default=None, gt=0, description="seconds a request may take, queueing included; a deployment may set "
                                        "its own")
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="seconds in-flight requests may finish after the first SIGTERM/SIGINT")
    handle_signals: bool = Field(
        default=True, description="drain on SIGINT/SIGTERM, log the actor tree on SIGUSR1 (off when the "
                                  "host program owns the signals)")
    metrics_prefix: Literal["atomr", "vllm"] = Field(
        default="atomr", description="prefix of the /metrics series; vllm: vLLM's exact names and labels, so "
                                     "its dashboards and the Kubernetes inference gateway read them")


async def serve(settings: ServerSettings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until a signal (or cancellation). Reports the bound URLs through task_status."""
    async with open_runtime(settings.deployments, settings.metrics_prefix) as runtime:
        deps = runtime.manager.snapshot().deployments
        if deps and all(d.state == "failed" for d in deps):
            # nothing to serve: say why and exit, rather than listen and answer 503 to everything
            raise StartupFailed("; ".join(f"deployment '{d.name}' failed to start: {d.reason}" for d in deps))
        app = create_app(runtime, settings.api_keys, settings.admin_keys, settings.request_timeout)
        hc = HypercornConfig()
        hc.bind = [f"{settings.host}:{settings.port}"]
        hc.accesslog = None
        # Our drain ends the streams itself (final chunk + [DONE]) and then stops Hypercorn, so
        # Hypercorn's own cut-off must come later.
        hc.graceful_timeout = settings.shutdown_timeout + 5
        stop, http_done = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:

            async def http(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                # Returns after the shutdown trigger, once in-flight responses are done (or
                # graceful_timeout passed); then the signal watcher is no longer needed.
                await hypercorn_serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)
                http_done.set()
                nursery.cancel_scope.cancel()

            async def drain() -> None:
                # In-flight requests may finish until the timeout; then the engines end the rest
                # ("abort": streams get a final chunk and [DONE], others a 503). Idle: every
                # ticket is back, so every handler and stream has ended; Hypercorn (shut down by
                # `stop`) then writes their last bytes, closes the idle keep-alive connections
                # and returns, which ends the nursery. One that still has not after
                # WRITE_GRACE_S (a connection we did not admit: an admin call, a slow reader) is
                # cut off with the rest.
                await stop.wait()
                runtime.begin_drain()
                with trio.move_on_after(settings.shutdown_timeout) as waited:
                    await runtime.wait_idle()
                if waited.cancelled_caught:
                    held = sum(d.admitted for d in runtime.manager.snapshot().deployments)
                    log.info("shutdown timeout: aborting %d request(s)", held)
                    await runtime.abort_all()
                    with trio.move_on_after(ABORT_GRACE_S):
                        await runtime.wait_idle()
                with trio.move_on_after(WRITE_GRACE_S):
                    await http_done.wait()
                nursery.cancel_scope.cancel()

            if settings.handle_signals:
                nursery.start_soon(_watch_signals, stop, nursery.cancel_scope, state_of(app))
            nursery.start_soon(drain)
            binds = await nursery.start(http)
            serving = ", ".join(f"{d.name} ({d.state})" for d in runtime.manager.snapshot().deployments)
            log.info("atomr_trio listening on %s, models: %s", ", ".join(binds), serving)
            task_status.started(binds)
        log.info("atomr_trio stopped")


async def _watch_signals(stop: trio.Event, scope: trio.CancelScope, state: GatewayState) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async for sig in signals:
            if sig == signal.SIGUSR1:
                log.info("actor tree: %s", json.dumps(state.tree(), indent=2))
            elif not stop.is_set():
                log.info("%s: draining; a second signal stops at once", signal.Signals(sig).name)
                stop.set()
            else:
                scope.cancel()
                return
