"""The listening sockets: the public port and, with `BROKER_ADMIN_PORT`, the admin port.

The admin port is a second listening socket of the same uvicorn server, not a second server:
one event loop, one lifespan and so one broker (one LISTEN connection, one hub) serve both,
and uvicorn's graceful shutdown covers both. `Guard` tells the two apart by the local port of
each request.
"""

from __future__ import annotations

import errno
import socket

from ..config.settings import Settings
from ..errors import ConfigError

__all__ = ["listen_sockets"]


def listen_sockets(settings: Settings) -> list[socket.socket]:
    """The public socket and the admin one, if any, bound before anything else starts, so a
    busy port or an address this machine lacks stops start-up at once. Raises `ConfigError`
    naming the setting to change."""
    sockets = [_bind(settings.host, settings.port, "BROKER_HOST", "BROKER_PORT")]
    if settings.admin_port is not None:
        admin_host = settings.admin_host or settings.host
        host_setting = "BROKER_ADMIN_HOST" if settings.admin_host else "BROKER_HOST"
        try:
            sockets.append(
                _bind(admin_host, settings.admin_port, host_setting, "BROKER_ADMIN_PORT")
            )
        except ConfigError:
            sockets[0].close()
            raise
    return sockets


def _bind(host: str, port: int, host_setting: str, port_setting: str) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ConfigError(
            f"invalid {host_setting}={host!r}: cannot resolve it ({exc.strerror or exc});"
            " use an address of this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(
                f"invalid {host_setting}={host!r}: not an address of this machine;"
                " use one it has, such as 127.0.0.1 or 0.0.0.0"
            ) from None
        if exc.errno == errno.EADDRINUSE:
            reason = "another process listens on it; stop that one or choose another port"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges); choose another"
        else:
            reason = f"cannot listen on {host!r}: {exc.strerror or exc}"
        raise ConfigError(f"invalid {port_setting}={port}: {reason}") from None
    return sock
