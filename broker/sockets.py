"""The listening sockets: the public port and, with `BROKER_ADMIN_PORT`, the admin port.

The admin port is a second listening socket of the same uvicorn server, not a second server:
one event loop, one lifespan and so one broker (one LISTEN connection, one hub) serve both,
and uvicorn's graceful shutdown covers both. `Guard` tells the two apart by the local port of
each request.
"""

from __future__ import annotations

import socket

import structlog

from .config import Settings
from .errors import ConfigError

__all__ = ["listen_sockets"]

log = structlog.get_logger(logger_name="broker.sockets")


def listen_sockets(settings: Settings) -> list[socket.socket] | None:
    """The public and admin sockets, bound, when there is an admin port; else None (uvicorn
    binds host:port itself). Raises `ConfigError` naming the setting when a bind fails."""
    if settings.admin_port is None:
        return None
    admin_host = settings.admin_host or settings.host
    sockets = [_bind(settings.host, settings.port, "BROKER_PORT")]
    try:
        sockets.append(_bind(admin_host, settings.admin_port, "BROKER_ADMIN_PORT"))
    except ConfigError:
        sockets[0].close()
        raise
    public = sockets[0].getsockname()
    log.info(
        "listening",
        public=f"{settings.host}:{public[1]}",
        admin=f"{admin_host}:{settings.admin_port}",
    )
    return sockets


def _bind(host: str, port: int, setting: str) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"invalid {setting}={port}: cannot listen on {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"invalid {setting}={port}: cannot listen on {host!r}: {exc}") from None
    return sock
