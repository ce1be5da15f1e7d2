"""`pgsse serve`: bind, reach the database, migrate, then serve in one process or N workers.

The listening sockets are bound first, so a port in use is one line on stderr before the
embedded database starts. With no database URL the embedded PostgreSQL under `--data-dir` is
created and started if needed, and stopped at exit only if it was started here
(`database.database_url`). Each broker process serves its app through `server/runner.py`,
imported only there (with `--workers N`, in each forked worker, `workers.py`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import structlog

from .config.settings import Settings
from .database import check_database, database_url, migrate
from .server.sockets import listen_sockets
from .web.guard import log_exposure
from .workers import run_workers

if TYPE_CHECKING:
    import socket

    from .web.limits import ClientCounter, SharedStreamCounter

__all__ = ["serve"]

log = structlog.get_logger(logger_name=__name__)


def serve(settings: Settings) -> int:
    """The `serve` command; its exit status."""
    sockets = listen_sockets(settings)  # public + admin port, if any
    try:
        with database_url(settings, create=True) as url:
            settings = dataclasses.replace(settings, database_url=url)
            if settings.migrate:
                migrate(url, settings.config, settings.capture, settings.capture_slot)
            else:
                check_database(url, settings.config, settings.capture, settings.capture_slot)
            log.info(
                "listening",
                addresses=[_address(sock) for sock in sockets],
                workers=settings.workers,
            )
            log_exposure(settings)
            if settings.workers == 1:
                return _run_broker(settings, sockets)
            if settings.bus_url is None:
                log.warning(
                    "workers_without_bus",
                    listening_backends=settings.workers,
                    advice="set BROKER_BUS_URL for one listening backend in all",
                )
            counter = _shared_counter(settings)
            return run_workers(
                settings.workers,
                lambda: _run_broker(settings, sockets, counter),
                begin=None if counter is None else counter.use_column,
            )
    finally:
        for sock in sockets:
            sock.close()


def _shared_counter(settings: Settings) -> SharedStreamCounter | None:
    """With --workers, BROKER_MAX_STREAMS_PER_IP counted over all of them (web/limits.py): room
    for twice as many addresses as streams may be open on the port."""
    if settings.max_streams_per_ip is None:
        return None
    from .web.limits import SharedStreamCounter

    entries = 2 * settings.workers * settings.max_connections
    return SharedStreamCounter(settings.max_streams_per_ip, settings.workers, entries)


def _run_broker(
    settings: Settings, sockets: list[socket.socket], counter: ClientCounter | None = None
) -> int:
    """One broker process serving `sockets` until SIGTERM/SIGINT; its exit status. uvicorn
    and the app are imported here, in the process that serves: with `--workers` the parent,
    which only forks and supervises, never loads them."""
    from .server.runner import run_server
    from .web.app import create_app

    return run_server(create_app(settings, counter), settings, sockets)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
