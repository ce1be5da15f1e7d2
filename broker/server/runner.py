"""One broker process's uvicorn: the app served on the bound sockets until SIGTERM/SIGINT.

On the first signal every stream is sent `error` and closed before anything else, so clients
reconnect to another instance while this one drains; then uvicorn shuts down within
`BROKER_SHUTDOWN_GRACE_SECONDS`. What this relies on in `uvicorn.Server` is listed in
`hooks.py`. The app is made by the caller (`serve.py`): this wing never imports `web/`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from types import FrameType
from typing import Protocol

import structlog
import uvicorn
from starlette.applications import Starlette

from ..config.settings import Settings
from .protocol import server_options

__all__ = ["run_server"]

log = structlog.get_logger(logger_name=__name__)


class Draining(Protocol):
    """What the app's lifespan keeps in `app.state.broker`: the broker, which closes its
    streams (`service.Broker`)."""

    def close_streams(self) -> None: ...


def run_server(app: Starlette, settings: Settings, sockets: list[socket.socket]) -> int:
    """Serve `app` on `sockets` until SIGTERM/SIGINT; the process's exit status."""

    class _Server(uvicorn.Server):
        """uvicorn, plus: on the first SIGTERM/SIGINT, every stream is sent `error` and
        closed, so that clients reconnect to another instance while this one drains. What
        this relies on in `uvicorn.Server` is listed in `server/hooks.py`."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            broker: Draining | None = getattr(app.state, "broker", None)  # set by the lifespan
            if first and broker is not None:
                # Streams first: nothing, not even a failing log line, may come before them.
                asyncio.get_running_loop().call_soon_threadsafe(broker.close_streams)
                log.info("shutdown_requested", signal=signal.Signals(sig).name)

    config = uvicorn.Config(
        app,
        **server_options(settings),  # request limits; client address behind proxies
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
        server_header=False,
    )
    server = _Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; ignoring it then lets a
    # graceful stop exit 0 as the contract says.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _tune_gc()
    server.run(sockets=sockets)
    log.info("stopped")
    return 0 if server.started else 1


def _tune_gc() -> None:
    """Fewer, cheaper collections: the objects of start-up (modules, app, settings) live for
    the whole run, so freeze them out of every collection; and let the young generation grow
    before it is collected, since each delivery allocates a few short-lived objects
    (py-spy under `make bench` fanout showed 6-9% of the broker's CPU in the collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
