"""The soak's clients: EventSource-like streams over raw asyncio sockets, cheap on CPU.

Each `Client` speaks HTTP/1.1 itself (through nginx), undoes chunked coding, splits SSE frames
at blank lines and records every message id it receives, in order, across its reconnections.
Like an `EventSource`, it reconnects with `Last-Event-ID` set to the last complete message
whenever its connection ends, for whatever reason: the broker closing it (slow consumer, replay
limit, shutdown, an error), the broker dying, or the soak dropping it on purpose with a FIN or
an RST. A frame cut off by a dropped connection is not counted, as a browser would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import struct
from array import array
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

import orjson

from tests.support.chunked import ChunkedDecoder

CONNECT_TIMEOUT = 10.0


@dataclass
class Record:
    """What one client saw over the whole soak."""

    ids: array[int] = field(default_factory=lambda: array("q"))
    times: array[float] = field(default_factory=lambda: array("d"))
    connects: int = 0
    connect_failures: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)  # "fin", "rst" (by the soak)
    heartbeats: int = 0
    foreign: int = 0  # messages that did not match the client's filter


class Client:
    def __init__(
        self,
        index: int,
        port: int,
        session_id: str | None,
        robot_id: str | None,
        resume_from: int,
        rng: random.Random,
    ) -> None:
        self.index, self.port = index, port
        self.session_id, self.robot_id = session_id, robot_id
        self.last_id = resume_from
        self.rng = rng
        self.record = Record()
        self.transport: asyncio.Transport | None = None
        self.stalled = False
        self.connected = asyncio.Event()  # first `connected` event seen
        self.live = asyncio.Event()  # `connected` seen on the current connection
        self._until, self._reached = 0, asyncio.Event()
        params = {"sessionId": session_id, "robotId": robot_id}
        self.target = "/api/sse/messages?" + urlencode({k: v for k, v in params.items() if v})
        # Substrings every message of this client's filter holds.
        self.checks = [b'"sessionId":' + orjson.dumps(session_id)] if session_id else []
        if robot_id:
            self.checks.append(b'"robotId":' + orjson.dumps(robot_id))

    def request(self) -> bytes:
        return (
            f"GET {self.target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Accept: text/event-stream\r\nLast-Event-ID: {self.last_id}\r\n\r\n"
        ).encode()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            ended: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(
                        functools.partial(SSEProtocol, self, ended), "127.0.0.1", self.port
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError):
                self.record.connect_failures += 1
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                continue
            self.record.connects += 1
            self.transport = transport
            await ended
            self.transport = None
            self.live.clear()
            if not stop.is_set():
                await asyncio.sleep(self.rng.uniform(0.05, 0.5))  # EventSource waits too

    def reached(self, row_id: int) -> asyncio.Event:
        """Set once this client has received row `row_id` (or a later one)."""
        self._until = row_id
        if self.last_id >= row_id:
            self._reached.set()
        return self._reached

    def received(self, row_id: int, at: float) -> None:
        self.record.ids.append(row_id)
        self.record.times.append(at)
        self.last_id = row_id
        if self._until and row_id >= self._until:
            self._reached.set()

    def drop(self, rst: bool) -> bool:
        """End the connection as a vanishing client would: FIN, or RST. False if not open."""
        transport = self.transport
        if transport is None or self.stalled or transport.is_closing():
            return False
        if rst:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
        self.record.drops["rst" if rst else "fin"] += 1
        return True

    async def stall(self, seconds: float) -> None:
        """Stop reading for `seconds` (the socket stays open), then read on."""
        transport = self.transport
        if transport is None:
            return
        self.stalled = True
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.stalled = False
            if not transport.is_closing():
                transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SSEProtocol(asyncio.Protocol):
    """One connection of a `Client`: response head, chunked body, SSE frames."""

    def __init__(self, client: Client, ended: asyncio.Future[None]) -> None:
        self.client, self.ended = client, ended
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.decoder: ChunkedDecoder | None = None  # once the head has come
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.client.request())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.decoder is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            status = int(head.split(b" ", 2)[1])
            self.client.record.statuses[status] += 1
            assert self.transport is not None
            if status != 200:
                self.transport.close()
                return
            self.decoder = ChunkedDecoder()
        self.body += self.decoder.feed(data)
        self._frames()
        if self.decoder.ended:  # the broker ended the stream; nginx keeps the connection
            assert self.transport is not None
            self.transport.close()

    def _frames(self) -> None:
        body, start = self.body, 0
        client, record = self.client, self.client.record
        now = asyncio.get_running_loop().time()
        while (end := body.find(b"\n\n", start)) >= 0:
            frame = bytes(body[start:end])
            start = end + 2
            if frame.startswith(b"id: "):
                newline = frame.index(b"\n")
                row_id = int(frame[4:newline])
                if not all(check in frame for check in client.checks):
                    record.foreign += 1
                client.received(row_id, now)
            elif b'"type":"heartbeat"' in frame:
                record.heartbeats += 1
            elif b'"type":"connected"' in frame:
                client.connected.set()
                client.live.set()
            elif b'"type":"error"' in frame:
                record.errors[orjson.loads(frame[6:])["error"]] += 1
        if start:
            del body[:start]


async def churn(
    clients: list[Client], rate: float, rng: random.Random, stop: asyncio.Event
) -> None:
    """Drop `rate` random clients a second, half with a FIN and half with an RST."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
            return
        rng.choice(clients).drop(rst=rng.random() < 0.5)
