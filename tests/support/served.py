"""The broker's uvicorn protocol on a real listening socket under a tiny ASGI app, and a raw
client: what the protocol's and the pipelining's tests drive."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from broker.config.settings import Settings
from broker.server.protocol import limited_protocol
from broker.server.sink import sink_of


@dataclass
class App:
    """`/stream` starts a response and waits for `http.disconnect`; `/finite` is a stream the
    test ends by setting `finish`; `/ok` answers at once; `/body` reads the body first."""

    gone: asyncio.Event = field(default_factory=asyncio.Event)
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        path = scope["path"]
        if path == "/body":
            body = b""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.gone.set()
                    return
                body += message["body"]
                if not message["more_body"]:
                    break
            self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/stream":
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone.set()
            return
        if path == "/sink":
            # A write through the sink between two ASGI writes: one body, in uvicorn's framing.
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
            sink = sink_of(scope)
            assert sink is not None and sink.write(b"direct")
        if path == "/finite":
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
            await self.finish.wait()
        await send({"type": "http.response.body", "body": b"done", "more_body": False})


@dataclass
class Served:
    app: App
    port: int
    state: ServerState

    async def holding(self) -> None:
        """Return once a connection holds bytes behind a queued request."""
        async with asyncio.timeout(5):
            # The protocol's state has no event to wait on: poll it, bounded.
            while not any(getattr(c, "_held", b"") for c in self.state.connections):  # noqa: ASYNC110
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Served]:
    """`App` served by `protocol_server`."""
    app = App()
    async with protocol_server(app) as (port, state):
        yield Served(app, port, state)


@contextlib.asynccontextmanager
async def protocol_server(app: Any) -> AsyncIterator[tuple[int, ServerState]]:
    """The protocol of `transport.limited_protocol` (2 s head and 1 s body deadlines) on a
    real listening socket, serving `app`: its port, and uvicorn's state of its connections."""
    settings = Settings(header_timeout_seconds=2, body_timeout_seconds=1)
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    protocol = limited_protocol(settings)
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1], state
    finally:
        server.close()
        for connection in list(state.connections):
            connection.transport.abort()
        for task in list(state.tasks):
            task.cancel()
        await server.wait_closed()


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until(self, marker: bytes, timeout: float = 5) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(marker), timeout)

    async def rest(self, timeout: float = 5) -> bytes:
        """Everything until the server closes the connection."""
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), timeout)
        return b""

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
