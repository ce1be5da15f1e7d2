"""broker.transport in-process: the protocol subclass on a real listening socket, under a tiny
ASGI app, driven by raw client sockets. These pin down what transport.py relies on in
uvicorn; `test_uvicorn_has_every_hook` names the hook when a uvicorn release drops one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from broker import transport
from broker.config import Settings
from broker.socketsink import sink_of
from broker.transport import MAX_HELD_BYTES, TESTED_UVICORN, check_uvicorn, limited_protocol


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


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    app = App()
    settings = Settings(header_timeout_seconds=2, body_timeout_seconds=1)
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    protocol = limited_protocol(settings)
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    try:
        yield Served(app, server.sockets[0].getsockname()[1], state)
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


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_the_running_request_hears_the_client_go_whatever_was_pipelined(
    served: Served, reset: bool
) -> None:
    async with Client(served.port) as client:
        await client.send(get("/stream") + get("/ok"))
        await client.until(b"started")
        started = time.monotonic()
        if reset:
            client.reset()
        else:
            client.writer.write_eof()
        await asyncio.wait_for(served.app.gone.wait(), 2)
    assert time.monotonic() - started < 1


async def test_requests_pipelined_behind_a_response_run_once_it_ends(served: Served) -> None:
    async with Client(served.port) as client:
        # One request queued behind the running one, and a third sent while both wait: it
        # is held unparsed, then parsed once the first ends.
        await client.send(get("/finite") + get("/ok"))
        await client.until(b"started")
        await client.send(get("/ok"))
        await served.holding()
        served.app.finish.set()
        answers = b""
        while answers.count(b"done") < 3:
            answers += await client.until(b"done")
        assert answers.count(b"HTTP/1.1 200 OK") == 2  # the first's head came with "started"


async def test_pipelining_past_the_hold_limit_cuts_the_connection(served: Served) -> None:
    async with Client(served.port) as client:
        await client.send(get("/stream") + get("/ok"))
        await client.until(b"started")
        with contextlib.suppress(ConnectionError):
            for _ in range(MAX_HELD_BYTES // 1024 + 2):
                await client.send(b"x" * 1024)
        await asyncio.wait_for(served.app.gone.wait(), 2)
        assert b"HTTP/1.1" not in await client.rest()  # nothing answered into the stream


async def test_a_body_must_arrive_in_time(served: Served) -> None:
    async with Client(served.port) as client:
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        started = time.monotonic()
        answer = await client.rest()
        assert 0.9 <= time.monotonic() - started < 2
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer
    assert answer.endswith(b'{"success":false,"error":"request body not received in time"}')
    assert served.app.gone.is_set() and served.app.bodies == []


async def test_a_body_in_time_is_read(served: Served) -> None:
    async with Client(served.port) as client:
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        await asyncio.sleep(0.5)
        await client.send(b"67890")
        assert b"done" in await client.until(b"done")
        await asyncio.sleep(1)  # past the body timeout: the connection is kept alive
        await client.send(get("/ok"))
        assert b"done" in await client.until(b"done")
    assert served.app.bodies == [b"1234567890"]


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 3", b"Transfer-Encoding: chunked"], ids=["length", "chunked"]
)
async def test_a_body_on_a_request_other_than_post_is_400(served: Served, framing: bytes) -> None:
    async with Client(served.port) as client:
        await client.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        answer = await client.rest(timeout=1)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"takes no body" in answer


async def test_an_empty_body_is_no_body(served: Served) -> None:
    async with Client(served.port) as client:
        await client.send(b"GET /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert b"done" in await client.until(b"done")


async def test_a_sink_write_is_part_of_the_response_body(served: Served) -> None:
    """What socketsink.py relies on: uvicorn frames a body with no Content-Length in chunks."""
    async with Client(served.port) as client:
        await client.send(get("/sink"))
        head = await client.until(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        chunked = await client.until(b"0\r\n\r\n")
    body, rest = b"", chunked
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if not size:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    assert body == b"starteddirectdone"


def test_uvicorn_has_every_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    check_uvicorn()
    protocol = transport.HttpToolsProtocol
    monkeypatch.setitem(transport.UVICORN_HOOKS, protocol, ("on_headers_complete", "self.gone"))
    with pytest.raises(RuntimeError, match=r"has no HttpToolsProtocol\.gone, which broker/trans"):
        check_uvicorn()


def test_the_tested_uvicorn_range_is_the_pinned_one() -> None:
    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("uvicorn")]
    assert pins == [f"uvicorn{TESTED_UVICORN}"]
    low, high = re.findall(r"[\d.]+", TESTED_UVICORN)
    version = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
