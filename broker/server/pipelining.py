"""uvicorn's httptools protocol, with pipelined requests that still hear their client go.

uvicorn tells only the last request it parsed on a connection that the client has gone, and
stops reading while a pipelined request waits for the running response, so a FIN or RST
behind it went unseen: a stream with a request pipelined behind it never learnt of it.
`PipelinedProtocol`:

- tells every request of the connection, the running one as well as those pipelined behind
  it, that the client has gone (FIN, RST, or a connection it closes), and the connection's
  `SocketSink`, where an event stream hears it (`SocketSink.when_lost`);
- keeps reading while a pipelined request waits: the bytes behind it are held, and parsed
  once it runs. What waits is bounded by `MAX_HELD_BYTES` in all: the bytes held plus, for
  each request already parsed and queued (those that came in the same read as the one
  running), its head and `QUEUED_REQUEST_COST` for its scope and cycle, which cost far more
  than its bytes (60 KB of pipelined `GET /healthz` behind a stream, in one write, held
  ~1.5 MiB). A client that pipelines more is cut off;
- gives the connection's flow control and each request a `LeanEvent` for uvicorn's
  `asyncio.Event`s, which cost ~760 B each for as long as a stream lasts.

It is the base of `transport.LimitedHttpToolsProtocol`, which adds the request deadlines and
limits; the uvicorn internals both rely on are listed in `hooks.UVICORN_HOOKS`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..log import Refusals
from .leanevent import LeanEvent
from .sink import SocketSink

__all__ = ["MAX_HELD_BYTES", "QUEUED_REQUEST_COST", "PipelinedProtocol"]

MAX_HELD_BYTES = 64 * 1024  # uvicorn's own bound on an unread body (HIGH_WATER_LIMIT)
# What a parsed request waiting in the queue costs beyond its head: its scope, headers list
# and cycle (~1 KiB measured), so at most 64 tiny requests wait behind a running one.
QUEUED_REQUEST_COST = 1024

log = structlog.get_logger(logger_name=__name__)
refusals = Refusals(log)  # log.py: at a bounded rate


class PipelinedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, reading on behind pipelined requests and telling each
    of them when the connection is lost."""

    # Slots, not the instance dict: uvicorn's attributes alone keep it a key-sharing dict
    # (at most 30 keys, ~300 B); ours on top made it a table of its own (~1.6 KB a connection).
    __slots__ = ("_cycles", "_held", "sink")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cycles: list[RequestResponseCycle] = []  # running and queued requests
        self._held = bytearray()  # bytes behind a queued request, parsed once it runs
        self.sink: SocketSink  # the connection's socket, for the streams (sink.py)

    @property
    def holding(self) -> bool:
        """True while bytes that arrive are held, not parsed: a request waits to run."""
        return bool(self.pipeline or self._held)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.sink = SocketSink(transport)
        flow = self.flow
        flow._is_writable_event = LeanEvent(flow._is_writable_event.is_set())

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_requests()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.holding:
            self._hold(data)
            return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is previous:
            return  # an upgrade: no request cycle
        self.cycle.message_event = LeanEvent()  # its task has yet to run: none waits on it
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete]
        self._cycles.append(self.cycle)
        if self.pipeline:
            if self._waiting_bytes() > MAX_HELD_BYTES:
                refusals.info("pipeline_overflow", "pipelined_too_much", held=len(self._held))
                self._refuse(None)
                return
            # Queued behind a running response: uvicorn stopped reading, which would hide
            # the client's going. Read on; `data_received` holds what arrives.
            self.flow.resume_reading()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.pipeline:  # a queued request's body, in the chunk that carried its head
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline or self.transport.is_closing():
            return
        # The last request queued now runs: parse what arrived behind it.
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            self.data_received(held)

    def _hold(self, data: bytes) -> None:
        self._held += data
        if self._waiting_bytes() > MAX_HELD_BYTES:
            refusals.info("pipeline_overflow", "pipelined_too_much", held=len(self._held))
            self._refuse(None)

    def _waiting_bytes(self) -> int:
        """What waits behind the running request: the bytes held, and the requests queued
        (their heads and `QUEUED_REQUEST_COST` each)."""
        total = len(self._held)
        for cycle, _ in self.pipeline:
            scope = cycle.scope
            total += QUEUED_REQUEST_COST + len(scope["raw_path"]) + len(scope["query_string"])
            total += sum(len(name) + len(value) for name, value in scope["headers"])
        return total

    def _refuse(self, answer: bytes | None) -> None:
        """Send `answer` and close, or with none abort (close would wait to flush to a peer
        that may never read). Every request on the connection is told the client has gone,
        so none writes after this."""
        self._held.clear()
        self._end_requests()
        if answer is None:
            self.transport.abort()
            return
        self.transport.write(answer)
        self.transport.close()

    def _end_requests(self) -> None:
        """Tell every request of the connection, running or queued, that it is gone, and
        the connection's sink (a stream learns it there, with no task waiting to hear it)."""
        self.sink.lost()
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
        self._cycles.clear()
