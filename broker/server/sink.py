"""A response's socket, as the server hands it to the app: the sink idle streams write to.

The protocol (`protocol.py`) puts a `SocketSink` for the connection's socket in each
request's scope (`scope["extensions"][SINK_EXTENSION]`). An event stream gives it to its
subscriber while idle (`subscriber.Sink`: the flusher writes events there without waking the
stream's task), reads how much the client has yet to take (replay pacing), and aborts a
client that takes nothing. Everything here depends on how uvicorn writes a response with no
`Content-Length` on HTTP/1.1: as chunks on the connection's transport (a line of uvicorn's
listed in `hooks.py`). The framing is written here and nowhere else; the sink's tests read it
back off a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SINK_EXTENSION", "SocketSink", "sink_of"]

SINK_EXTENSION = "pgsse.sink"


class SocketSink:
    """One connection's socket: chunked writes of a running response's body, and the news
    that its client has gone (`when_lost`), which the protocol brings (`lost`)."""

    __slots__ = ("_fd", "_lost", "_on_lost", "_transport")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._fd = _plain_socket_fd(transport)
        self._lost = False
        self._on_lost: Callable[[], object] | None = None

    def when_lost(self, callback: Callable[[], object] | None) -> None:
        """Call `callback` once the client has gone: at once if it has already. None
        forgets the callback (the response that set it has ended)."""
        if callback is not None and self._lost:
            callback()
            return
        self._on_lost = callback

    def lost(self) -> None:
        """The client has gone (FIN, RST, or the connection closed): called by the protocol."""
        self._lost = True
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def write(self, data: bytes) -> bool:
        """Write `data` as one HTTP chunk, unless the socket still holds earlier bytes or is
        closing (then False, nothing written: the caller goes through ASGI send, which
        applies flow control)."""
        transport = self._transport
        if transport.get_write_buffer_size() or transport.is_closing():
            return False
        framed = _last_framed
        if data is not framed.data:  # the event of a fan-out is framed once, for all sinks
            framed.data = data
            framed.chunk = b"%x\r\n%b\r\n" % (len(data), data)
        chunk = framed.chunk
        sent = 0
        if self._fd >= 0:  # see _plain_socket_fd
            # Full (the rest is buffered) or broken (the transport finds that out): OSError.
            with contextlib.suppress(OSError):
                sent = os.write(self._fd, chunk)
        if sent < len(chunk):
            transport.write(memoryview(chunk)[sent:] if sent else chunk)
        return True

    def buffered(self) -> int:
        """Bytes written to the socket that the client has yet to take."""
        return self._transport.get_write_buffer_size()

    def abort(self) -> None:
        """Cut the connection now, dropping what is buffered for it."""
        self._transport.abort()


class _Framed:
    """The last body written and its chunk: the flusher writes one event's bytes to every
    idle subscriber in turn, so the chunk is built once and shared."""

    __slots__ = ("chunk", "data")

    def __init__(self) -> None:
        self.data = b""
        self.chunk = b""


_last_framed = _Framed()


def _plain_socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a plain TCP transport's socket, else -1.

    With nothing buffered in the transport, `write` hands the bytes to the socket itself:
    `os.write` costs 0.7 us less per delivery than uvloop's `transport.write` (`make bench`,
    fanout: 1,000 writes per row), and what the socket does not take goes through the
    transport, which keeps the order and applies flow control. Never for TLS, whose bytes
    must pass through the transport's encryption. `write` checks `is_closing()` first, so a
    descriptor number the kernel reuses after this connection closes is never written.
    """
    if transport.get_extra_info("sslcontext") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


def sink_of(scope: Mapping[str, Any]) -> SocketSink | None:
    """The request's `SocketSink`, or None when the server is not ours (no direct writes)."""
    sink: SocketSink | None = scope.get("extensions", {}).get(SINK_EXTENSION)
    return sink
