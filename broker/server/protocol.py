"""Under the app: uvicorn's HTTP protocol with request limits, and its proxy headers.

uvicorn bounds neither the time a client may take to send its request head or body nor the
head's size (with httptools). `limited_protocol` returns a subclass of uvicorn's httptools
protocol (by way of `pipelining.PipelinedProtocol`, which lets every request of a connection,
pipelined ones too, hear its client go) that:

- arms a timer when a connection opens, and again when a further request on a kept-alive
  connection begins, and aborts the connection unless the headers are complete in time
  (`BROKER_HEADER_TIMEOUT_SECONDS`); nothing is sent, as nginx does, since the peer may be
  a browser's idle pre-connection;
- answers 431 and closes once the request line plus headers exceed `BROKER_MAX_HEADER_BYTES`,
  counting raw bytes while the head is incomplete so an endless header is cut off too;
- answers 400 and closes when a request other than POST declares a body (no other endpoint
  takes one), and 408 and closes unless a body arrives whole within
  `BROKER_BODY_TIMEOUT_SECONDS` of its headers, on every endpoint;
- puts the connection's `SocketSink` (`pipelining.py` makes it) in the request scope
  (`sink.py`), so an idle event stream can be written to without a task switch, a stuck
  one aborted, and every stream told its client has gone without a task to wait for it.

The uvicorn internals this module and its base, pipelining.py, rely on are listed in
`hooks.py` with every other one pgsse relies on (`check_uvicorn` refuses to start on a uvicorn
that lacks one, naming it); the protocol's tests drive each of them over real sockets.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from ..config.settings import Settings
from ..events import error_body
from ..log import Refusals
from .hooks import check_uvicorn
from .pipelining import MAX_HELD_BYTES, PipelinedProtocol
from .sink import SINK_EXTENSION

__all__ = [
    "MAX_HELD_BYTES",
    "LimitedHttpToolsProtocol",
    "limited_protocol",
    "server_options",
]


NOSNIFF = "x-content-type-options: nosniff\r\n"


def _answer(status: int, error: str) -> bytes:
    """A complete JSON error answer that closes the connection, for refusals made here."""
    body = error_body(error)
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n{NOSNIFF}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


RESPONSE_431 = _answer(431, "request headers too large")
RESPONSE_408 = _answer(408, "request body not received in time")
RESPONSE_400_BODY = _answer(400, "this request takes no body")
RESPONSE_400_INVALID = _answer(400, "invalid HTTP request")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = structlog.get_logger(logger_name=__name__)
refusals = Refusals(log)  # log.py: at a bounded rate


class LimitedHttpToolsProtocol(PipelinedProtocol):
    """uvicorn's httptools protocol, with deadlines and size limits on each request."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024

    # Slots, as in PipelinedProtocol: they keep uvicorn's instance dict small.
    __slots__ = ("_head_parsed", "_head_raw", "_in_head", "_refused", "_timer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None  # the head's or the body's deadline
        self._in_head = True  # between the end of a request and the end of the next head
        self._head_raw = 0  # bytes received since the head began, while it is incomplete
        self._head_parsed = 0  # bytes of request target and headers the parser reported
        self._refused = False  # the connection is being closed: ignore the rest

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.holding:
            super().data_received(data)  # held behind a queued request, parsed once it runs
            return
        if self._in_head:
            self._head_raw += len(data)
        super().data_received(data)
        # Still in a head after this chunk: the bytes counted were all head bytes.
        if self._in_head and not self._refused and self._head_raw > self.max_header_bytes:
            self._refuse(RESPONSE_431 if self._line_idle() else None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._head_parsed = 0
        if self._timer is None:
            self._arm(self.header_timeout, self._head_timed_out)
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
            self._refuse(RESPONSE_431 if self._line_idle() else None)
            return
        has_body = _declares_body(self.headers)
        if has_body and self.parser.get_method() != b"POST":
            self._refuse(RESPONSE_400_BODY if self._line_idle() else None)
            return
        # The socket, for the streams' direct writes.
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[SINK_EXTENSION] = self.sink
        previous = self.cycle
        super().on_headers_complete()
        if has_body and self.cycle is not previous and not self.pipeline:
            self._arm(self.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()  # the body's deadline, if any
        self._in_head = True  # whatever arrives next is the next request's head
        self._head_raw = 0
        super().on_message_complete()

    # uvicorn's callback when a response ends

    def on_response_complete(self) -> None:
        super().on_response_complete()  # the next request queued, if any, now runs
        if self.pipeline or self.transport.is_closing():
            return
        # The request now running is still receiving its body: time it.
        if not (self._in_head or self._refused or self._timer):
            self._arm(self.body_timeout, self._body_timed_out)

    # uvicorn's answer to a request it cannot parse, in plain text: ours is JSON

    def send_400_response(self, msg: str) -> None:
        refusals.info("request_invalid", msg)
        cycle = self.cycle
        answerable = cycle is None or cycle.response_complete or not cycle.response_started
        self._refuse(RESPONSE_400_INVALID if answerable else None)

    # limits

    def _line_idle(self) -> bool:
        """True when no response is being written on the connection, so one may be."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self, seconds: float, expired: Callable[[], None]) -> None:
        self._timer = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        self._refuse(None)

    def _body_timed_out(self) -> None:
        self._timer = None
        log.info("body_timeout", seconds=self.body_timeout)
        cycle = self.cycle
        self._refuse(RESPONSE_408 if cycle is not None and not cycle.response_started else None)

    def _refuse(self, answer: bytes | None) -> None:
        self._refused = True
        self._disarm()
        super()._refuse(answer)


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


def limited_protocol(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, with `settings`' limits."""
    check_uvicorn()

    class Protocol(LimitedHttpToolsProtocol):
        header_timeout = settings.header_timeout_seconds
        body_timeout = settings.body_timeout_seconds
        max_header_bytes = settings.max_header_bytes

    return Protocol


def server_options(settings: Settings) -> dict[str, Any]:
    """`uvicorn.Config` arguments for the protocol and for the client's address.

    The client address is uvicorn's own proxy-header handling: with `BROKER_TRUSTED_PROXIES`
    it reads `X-Forwarded-For` from the right, skipping trusted proxies, and takes the first
    address none vouches for, so entries a client wrote itself are never believed. With no
    trusted proxy the header is ignored (uvicorn's default would trust 127.0.0.1). An IPv4
    proxy is trusted in its IPv4-mapped IPv6 form too, as a dual-stack socket reports it.
    """
    trusted = [str(network) for network in _with_ipv4_mapped(settings.trusted_proxies)]
    return {
        "http": limited_protocol(settings),
        "headers": [("X-Content-Type-Options", "nosniff")],  # on every answer uvicorn sends
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted,
    }


def _with_ipv4_mapped(networks: Sequence[Network]) -> list[Network]:
    mapped = [
        ipaddress.IPv6Network(f"::ffff:{network.network_address}/{96 + network.prefixlen}")
        for network in networks
        if network.version == 4
    ]
    return [*networks, *mapped]
