"""serve: run the Runtime (deployments, metrics) and the Gateway (Hypercorn) as sibling tasks in
one nursery we own.

Invariant: the first SIGINT/SIGTERM stops accepting and lets in-flight requests finish (up to
`shutdown_timeout`); a second signal cancels everything at once. SIGUSR1 logs the actor tree.
Leaving the nursery stops every engine. A server whose every deployment failed at start raises
`StartupFailed` instead of listening (the CLI exits non-zero with the causes); deployments that
fail later, or are added later, leave the server up for the others.
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..runtime.deployment import DeploymentSpec
from ..runtime.tree import Runtime, open_runtime
from .app import create_app

log = logging.getLogger("atomr_trio")


class StartupFailed(RuntimeError):
    """Every deployment failed while the server started: there is nothing to serve."""


@dataclass
class ServerSettings:
    deployments: list[DeploymentSpec] = field(default_factory=lambda: [DeploymentSpec(name="default")])
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    handle_signals: bool = True
    metrics_prefix: str = "atomr"  # or "vllm": /metrics carries vLLM's exact series names


async def serve(settings: ServerSettings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until a signal (or cancellation). Reports the bound URLs through task_status."""
    async with open_runtime(settings.deployments, settings.metrics_prefix) as runtime:
        deps = list(runtime.manager.deployments.values())
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
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def http(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                # Returns after the shutdown trigger, once in-flight responses are done (or
                # graceful_timeout passed); then the signal watcher is no longer needed.
                await hypercorn_serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()

            def in_flight() -> int:
                return sum(d.in_flight() for d in runtime.manager.deployments.values())

            async def drain() -> None:
                # In-flight requests may finish until the timeout; then the engines end the rest
                # ("abort": streams get a final chunk and [DONE], others a 503). Hypercorn would
                # also wait for idle keep-alive connections, so we stop it once nothing is left.
                await stop.wait()
                runtime.draining = True
                with trio.move_on_after(settings.shutdown_timeout):
                    while in_flight():
                        await trio.sleep(0.05)
                if in_flight():
                    log.info("shutdown timeout: aborting %d request(s)", in_flight())
                    await runtime.abort_all()
                    with trio.move_on_after(2):
                        while in_flight():
                            await trio.sleep(0.02)
                await trio.sleep(0.3)  # let the handlers write their last events
                nursery.cancel_scope.cancel()

            if settings.handle_signals:
                nursery.start_soon(_watch_signals, stop, nursery.cancel_scope, runtime)
            nursery.start_soon(drain)
            binds = await nursery.start(http)
            serving = ", ".join(f"{d.name} ({d.state})" for d in runtime.manager.deployments.values())
            log.info("atomr_trio listening on %s, models: %s", ", ".join(binds), serving)
            task_status.started(binds)
        log.info("atomr_trio stopped")


async def _watch_signals(stop: trio.Event, scope: trio.CancelScope, runtime: Runtime) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async for sig in signals:
            if sig == signal.SIGUSR1:
                log.info("actor tree: %s", json.dumps(runtime.tree(), indent=2))
            elif not stop.is_set():
                log.info("%s: draining; a second signal stops at once", signal.Signals(sig).name)
                stop.set()
            else:
                scope.cancel()
                return
