"""A raw-socket SSE client for tests: real HTTP/1.1 bytes, chunked decoding, SSE framing.

Nothing here buffers a whole body: events are parsed as the bytes arrive, so an endless stream
is read as a browser reads it. Every read is bounded by a timeout, so a hang fails fast.

Also what many tests do with it: `subscribe` (a stream of a broker, read up to `connected`),
`connected` (check a stream opened), `Follower` (a browser's EventSource: it resumes on every
end of its stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from tests.support.processes import BrokerProcess

OPEN_CLIENTS: list[SSEClient] = []  # closed by the `close_clients` fixture after each test


@dataclass
class SSEEvent:
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    raw: bytes = b""

    @property
    def json(self) -> dict[str, Any]:
        assert self.data is not None, f"event has no data: {self.raw!r}"
        value: dict[str, Any] = json.loads(self.data)
        return value

    @property
    def type(self) -> str | None:
        return None if self.data is None else self.json.get("type")


@dataclass
class SSEClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    _chunked: bool = False
    _buffer: bytes = b""
    _eof: bool = False

    @classmethod
    async def open(
        cls,
        port: int,
        path: str = "/api/sse/messages",
        params: dict[str, str] | list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> SSEClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls), timeout
        )
        target = path + ("?" + urlencode(params) if params else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        client = cls(reader, writer)
        OPEN_CLIENTS.append(client)
        await asyncio.wait_for(client._read_head(), timeout)
        return client

    async def _read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    async def _more(self) -> bool:
        """Append the next piece of the body to the buffer; False at its end."""
        if self._eof:
            return False
        if not self._chunked:
            data = await self.reader.read(65536)
            if not data:
                self._eof = True
                return False
            self._buffer += data
            return True
        size_line = await self.reader.readline()
        if not size_line:
            self._eof = True
            return False
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            self._eof = True
            return False
        self._buffer += await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return True

    async def body(self, timeout: float = 10.0) -> bytes:
        """The rest of the body (for a finite answer such as a 4xx)."""

        async def read_all() -> bytes:
            length = self.headers.get("content-length")
            if length is not None and not self._chunked:
                return await self.reader.readexactly(int(length))
            while await self._more():
                pass
            return self._buffer

        return await asyncio.wait_for(read_all(), timeout)

    async def event(self, timeout: float = 10.0) -> SSEEvent:
        """The next event (frames of only comments are skipped). EOFError at the end."""
        return await asyncio.wait_for(self._event(), timeout)

    async def _event(self) -> SSEEvent:
        while True:
            while b"\n\n" not in self._buffer:
                if not await self._more():
                    raise EOFError(f"stream ended; unparsed: {self._buffer!r}")
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            event = parse_frame(frame)
            if event.data is not None or event.id is not None or event.retry is not None:
                return event

    async def events_until(self, predicate: Any, timeout: float = 10.0) -> list[SSEEvent]:
        """Events up to and including the first one for which `predicate(event)` holds."""

        async def collect() -> list[SSEEvent]:
            seen = []
            while True:
                event = await self._event()
                seen.append(event)
                if predicate(event):
                    return seen

        return await asyncio.wait_for(collect(), timeout)

    async def message(self, timeout: float = 10.0) -> SSEEvent:
        """The next `message` event, skipping heartbeats and the like."""
        return (await self.events_until(lambda e: e.type == "message", timeout))[-1]

    async def close(self) -> None:
        if self in OPEN_CLIENTS:
            OPEN_CLIENTS.remove(self)
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def parse_frame(frame: bytes) -> SSEEvent:
    event = SSEEvent(raw=frame)
    data_lines = []
    for line in frame.decode("utf-8").split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data_lines.append(value)
        elif name == "id":
            event.id = value
        elif name == "retry":
            event.retry = int(value)
    if data_lines:
        event.data = "\n".join(data_lines)
    return event


async def subscribe(broker: BrokerProcess, **params: str) -> SSEClient:
    """Open a stream and read up to its `connected` event."""
    client = await SSEClient.open(broker.port, params=params)
    assert client.status == 200
    connected = await client.event()
    assert connected.type == "connected" and connected.retry == 3000
    return client


async def connected(client: SSEClient) -> SSEClient:
    """Check that `client` is a live stream: 200, then `retry` and `connected` events."""
    assert client.status == 200, await client.body()
    assert client.headers["content-type"].startswith("text/event-stream")
    await client.events_until(lambda event: event.type == "connected", timeout=5)
    return client


@dataclass
class Follower:
    """A browser's EventSource for one session, through nginx: on any end of the stream it
    reconnects with `Last-Event-ID`, until the session's row with content "end"."""

    port: int
    session: str
    ids: list[int] = field(default_factory=list)
    connections: int = 0
    refused: list[int] = field(default_factory=list)
    first_row: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            headers = {"Last-Event-ID": str(self.ids[-1])} if self.ids else {}
            client = await SSEClient.open(
                self.port, params={"sessionId": self.session}, headers=headers
            )
            try:
                if client.status != 200:
                    self.refused.append(client.status)
                    await asyncio.sleep(0.1)
                    continue
                self.connections += 1
                self.opened.set()
                if await self._read(client):
                    return
            except (EOFError, ConnectionError):
                pass  # the instance died: nginx ended the stream; reconnect
            finally:
                await client.close()

    async def _read(self, client: SSEClient) -> bool:
        """True at the "end" row; False when the broker ends the stream with `error`."""
        while True:
            event = await client.event(timeout=30)
            if event.type == "error":
                return False
            if event.type == "message":
                assert event.id is not None
                self.ids.append(int(event.id))
                self.first_row.set()
                if event.json["data"]["content"] == "end":
                    return True
