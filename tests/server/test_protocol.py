"""broker.server.protocol in-process: the protocol subclass on a real listening socket, under a tiny
ASGI app, driven by raw client sockets: request deadlines and limits, and the sink's framing.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import pytest

from broker.server.leanevent import LeanEvent
from tests.support.served import Client, Served, get, serving


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as served:
        yield served


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
    """What server/sink.py relies on: uvicorn frames a body with no Content-Length in chunks."""
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


async def test_a_connection_keeps_uvicorn_s_small_instance_dict(served: Served) -> None:
    """The subclasses' state is in slots: the protocol's instance dict stays a key-sharing
    one (at most 30 keys, a few hundred bytes) rather than a table of its own (~1.6 KB)."""
    async with Client(served.port) as client:
        await client.send(get("/stream"))
        await client.until(b"started")
        (protocol,) = served.state.connections
        assert len(vars(protocol)) <= 30
        assert sys.getsizeof(vars(protocol)) < 600
        # uvicorn's events, the connection's and the request's, are lean ones.
        assert isinstance(protocol.flow._is_writable_event, LeanEvent)
        assert isinstance(protocol.cycle.message_event, LeanEvent)
