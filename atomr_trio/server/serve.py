"""serve: run an engine and the Gateway (Hypercorn) as sibling tasks in one nursery we own.

Invariant: the first SIGINT/SIGTERM stops accepting and lets Hypercorn finish in-flight
responses; a second signal cancels everything at once. Leaving the nursery stops the engine.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..async_llm import open_engine
from ..config import EngineConfig
from .gateway import create_app

log = logging.getLogger("atomr_trio")


@dataclass
class ServerSettings:
    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)
    shutdown_timeout: float = 30.0


async def serve(settings: ServerSettings, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until a signal (or cancellation). Reports the bound URLs through task_status."""
    async with open_engine(settings.model, settings.engine) as engine:
        name = settings.served_model_name or engine.model_name
        app = create_app(engine, name, settings.api_keys)
        hc = HypercornConfig()
        hc.bind = [f"{settings.host}:{settings.port}"]
        hc.accesslog = None
        hc.graceful_timeout = settings.shutdown_timeout
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def http(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                # Returns after the shutdown trigger, once in-flight responses are done (or
                # graceful_timeout passed); then the signal watcher is no longer needed.
                await hypercorn_serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()

            async def drain() -> None:
                # Hypercorn waits for idle keep-alive connections too; once the engine has no
                # request left (or the timeout passed), nothing is in flight: stop everything.
                await stop.wait()
                with trio.move_on_after(settings.shutdown_timeout):
                    while engine.core.num_running or engine.core.num_waiting:
                        await trio.sleep(0.05)
                await trio.sleep(0.2)  # let the last responses finish writing
                nursery.cancel_scope.cancel()

            nursery.start_soon(_watch_signals, stop, nursery.cancel_scope)
            nursery.start_soon(drain)
            binds = await nursery.start(http)
            log.info("atomr_trio listening on %s, serving model %r (%s, max_model_len %s)",
                     ", ".join(binds), name, engine.config.dtype, engine.config.max_model_len)
            task_status.started(binds)
        log.info("atomr_trio stopped")


async def _watch_signals(stop: trio.Event, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for sig in signals:
            if not stop.is_set():
                log.info("%s: draining; a second signal stops at once", signal.Signals(sig).name)
                stop.set()
            else:
                scope.cancel()
                return
