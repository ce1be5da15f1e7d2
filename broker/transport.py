"""Under the app: uvicorn's HTTP protocol with request limits, and its proxy headers.

uvicorn bounds neither the time a client may take to send its request head or body nor the
head's size (with httptools), and it tells only the last request it parsed on a connection
that the client has gone. `limited_protocol` returns a subclass of uvicorn's httptools
protocol that:

- arms a timer when a connection opens, and again when a further request on a kept-alive
  connection begins, and aborts the connection unless the headers are complete in time
  (`BROKER_HEADER_TIMEOUT_SECONDS`); nothing is sent, as nginx does, since the peer may be
  a browser's idle pre-connection;
- answers 431 and closes once the request line plus headers exceed `BROKER_MAX_HEADER_BYTES`,
  counting raw bytes while the head is incomplete so an endless header is cut off too;
- answers 400 and closes when a request other than POST declares a body (no other endpoint
  takes one), and 408 and closes unless a body arrives whole within
  `BROKER_BODY_TIMEOUT_SECONDS` of its headers, on every endpoint;
- tells every request of the connection, the running one as well as those pipelined behind
  it, that the client has gone (FIN, RST, or a connection it closes): uvicorn marks only the
  last request parsed, so a stream with a request pipelined behind it never learnt of it;
- keeps reading while a pipelined request waits for the running response (uvicorn stops
  reading then, so a FIN or RST went unseen): the bytes behind it are held, at most
  `MAX_HELD_BYTES`, and parsed once it runs; a client that pipelines more is cut off;
- puts a `SocketSink` of the connection in the request scope (`socketsink.py`), so an idle
  event stream can be written to without a task switch and a stuck one aborted.

This module is the one place that touches uvicorn's internals (`UVICORN_HOOKS`);
`check_uvicorn` refuses to start on a uvicorn that lacks one, naming it, and
tests/test_transport.py drives each of them over real sockets.
"""

from __future__ import annotations

import asyncio
import http
import inspect
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .answers import error_body
from .config import Settings
from .socketsink import SINK_EXTENSION, SocketSink

__all__ = [
    "MAX_HELD_BYTES",
    "UVICORN_HOOKS",
    "LimitedHttpToolsProtocol",
    "check_uvicorn",
    "limited_protocol",
    "server_options",
]

MAX_HELD_BYTES = 64 * 1024  # uvicorn's own bound on an unread body (HIGH_WATER_LIMIT)
TESTED_UVICORN = ">=0.55,<0.56"  # as pinned in pyproject.toml

# What this module relies on, by owner: methods it overrides or calls, attributes it reads.
UVICORN_HOOKS: dict[type, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "self.cycle",
        "self.pipeline",
        "self.flow",
        "self.headers",
        "self.scope",
        "self.parser",
        "self.loop",
        "self.transport",
    ),
    FlowControl: ("resume_reading",),
    RequestResponseCycle: (
        "self.disconnected",
        "self.message_event",
        "self.response_started",
        "self.response_complete",
    ),
}


def _answer(status: int, error: str) -> bytes:
    """A complete JSON error answer that closes the connection, for refusals made here."""
    body = error_body(error)
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


RESPONSE_431 = _answer(431, "request headers too large")
RESPONSE_408 = _answer(408, "request body not received in time")
RESPONSE_400_BODY = _answer(400, "this request takes no body")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = structlog.get_logger(logger_name="broker.transport")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with deadlines and size limits on each request and
    connection loss told to every request of the connection."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None  # the head's or the body's deadline
        self._in_head = True  # between the end of a request and the end of the next head
        self._head_raw = 0  # bytes received since the head began, while it is incomplete
        self._head_parsed = 0  # bytes of request target and headers the parser reported
        self._refused = False  # the connection is being closed: ignore the rest
        self._cycles: list[RequestResponseCycle] = []  # running and queued requests
        self._held = bytearray()  # bytes behind a queued request, parsed once it runs

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._end_requests()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.pipeline or self._held:
            self._hold(data)
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
        extensions[SINK_EXTENSION] = SocketSink(self.transport)
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is previous:
            return  # an upgrade: no request cycle
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete]
        self._cycles.append(self.cycle)
        if self.pipeline:
            # Queued behind a running response: uvicorn stopped reading, which would hide
            # the client's going. Read on; `data_received` holds what arrives.
            self.flow.resume_reading()
        elif has_body:
            self._arm(self.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        if self.pipeline:  # a queued request's body, in the chunk that carried its head
            self.flow.resume_reading()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()  # the body's deadline, if any
        self._in_head = True  # whatever arrives next is the next request's head
        self._head_raw = 0
        super().on_message_complete()

    # uvicorn's callback when a response ends

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline or self.transport.is_closing():
            return
        # The last request queued now runs: parse what arrived behind it, and time its body.
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            self.data_received(held)
        if not (self.pipeline or self._in_head or self._refused or self._timer):
            self._arm(self.body_timeout, self._body_timed_out)

    # limits

    def _hold(self, data: bytes) -> None:
        self._held += data
        if len(self._held) > MAX_HELD_BYTES:
            log.info("pipeline_overflow", held=len(self._held))
            self._refuse(None)

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
        """Send `answer` and close, or with none abort (close would wait to flush to a peer
        that may never read). Every request on the connection is told the client has gone,
        so none writes after this."""
        self._refused = True
        self._disarm()
        self._held.clear()
        self._end_requests()
        if answer is None:
            self.transport.abort()
            return
        self.transport.write(answer)
        self.transport.close()

    def _end_requests(self) -> None:
        """Tell every request of the connection, running or queued, that it is gone."""
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
        self._cycles.clear()


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


def check_uvicorn() -> None:
    """Raise `RuntimeError` naming the first of `UVICORN_HOOKS` the installed uvicorn lacks."""
    for owner, hooks in UVICORN_HOOKS.items():
        source = inspect.getsource(owner)
        for hook in hooks:
            present = (
                f"{hook} =" in source or f"{hook}:" in source
                if hook.startswith("self.")
                else callable(getattr(owner, hook, None))
            )
            if not present:
                raise RuntimeError(
                    f"uvicorn {uvicorn.__version__} has no {owner.__name__}"
                    f".{hook.removeprefix('self.')}, which broker/transport.py relies on"
                    f" (tested: uvicorn{TESTED_UVICORN})"
                )


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
