"""Under the app: uvicorn's HTTP protocol with request-head limits, and the listening sockets.

uvicorn bounds neither the time a client may take to send its request line and headers nor
their size (with httptools), so one client holding thousands of half-sent requests
(slowloris) or streaming an endless header costs the broker sockets and memory for ever.
`limited_protocol` returns a subclass of uvicorn's httptools protocol that:

- arms a timer when a connection opens, and again when a further request on a kept-alive
  connection begins, and aborts the connection unless the headers are complete in time
  (`BROKER_HEADER_TIMEOUT_SECONDS`); nothing is sent, as nginx does, since the peer may be
  a browser's idle pre-connection;
- answers 431 and closes once the request line plus headers exceed `BROKER_MAX_HEADER_BYTES`,
  counting raw bytes while the head is incomplete so an endless header is cut off too;
- puts the connection's transport in the request scope (`scope["extensions"]`), so an idle
  event stream can be written to without a task switch (see `stream.py`).

The admin port (`BROKER_ADMIN_PORT`) is a second listening socket of the same uvicorn server,
not a second server: one event loop, one lifespan and so one broker (one LISTEN connection,
one hub) serve both, and uvicorn's graceful shutdown covers both. `Guard` tells the two apart
by the local port of each request.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Settings
from .errors import ConfigError

__all__ = ["TRANSPORT_EXTENSION", "LimitedHttpToolsProtocol", "limited_protocol", "listen_sockets"]

TRANSPORT_EXTENSION = "pgsse.transport"

_BODY_431 = b'{"success":false,"error":"request headers too large"}'
RESPONSE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY_431)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY_431
)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size limit on each request head."""

    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # between the end of a request and the end of the next head
        self._head_raw = 0  # bytes received since the head began, while it is incomplete
        self._head_parsed = 0  # bytes of request target and headers the parser reported
        self._refused = False  # the connection is being closed: ignore the rest

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_raw += len(data)
        super().data_received(data)
        # Still in a head after this chunk: the bytes counted were all head bytes.
        if self._in_head and not self._refused and self._head_raw > self.max_header_bytes:
            self._refuse_head()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._head_parsed = 0
        if self._head_timer is None:
            self._arm()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._head_parsed += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._head_parsed += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = False
        self._head_raw = 0
        if self._head_parsed > self.max_header_bytes:
            self._refuse_head()
            return
        # The socket, for the streams' direct writes (stream.py, `TRANSPORT_EXTENSION`).
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[TRANSPORT_EXTENSION] = self.transport
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_head = True  # whatever arrives next is the next request's head
        self._head_raw = 0
        super().on_message_complete()

    # limits

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refused = True
        # abort, not close: close would wait to flush to a peer that may never read.
        self.transport.abort()

    def _refuse_head(self) -> None:
        self._refused = True
        self._disarm()
        # A response may be streaming on this connection (a pipelined request): never
        # interleave bytes into it, just close.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(RESPONSE_431)
        self.transport.close()


def limited_protocol(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, with `settings`' limits."""

    class Protocol(LimitedHttpToolsProtocol):
        header_timeout = settings.header_timeout_seconds
        max_header_bytes = settings.max_header_bytes

    return Protocol


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
