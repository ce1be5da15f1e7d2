"""broker.server.sink in-process, on a real TCP connection: chunk framing, refusal while the
socket holds bytes, abort, and the news that the client has gone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from broker.server.sink import SINK_EXTENSION, SocketSink, sink_of


@dataclass
class Pair:
    sink: SocketSink
    transport: asyncio.WriteTransport
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    served = await asyncio.wait_for(accepted, 5)
    transport = served.transport
    try:
        yield Pair(SocketSink(transport), transport, reader, writer)
    finally:
        transport.abort()
        writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_write_frames_one_chunk(pair: Pair) -> None:
    assert pair.sink.write(b"data: 1\n\n")
    assert await asyncio.wait_for(pair.reader.readexactly(14), 5) == b"9\r\ndata: 1\n\n\r\n"


async def test_each_body_gets_its_own_chunk_when_bodies_alternate(pair: Pair) -> None:
    for body in (b"data: 1\n\n", b"data: 22\n\n", b"data: 1\n\n"):
        assert pair.sink.write(body)
    expected = b"9\r\ndata: 1\n\n\r\na\r\ndata: 22\n\n\r\n9\r\ndata: 1\n\n\r\n"
    assert await asyncio.wait_for(pair.reader.readexactly(len(expected)), 5) == expected


async def test_a_socket_holding_bytes_refuses_and_writes_nothing(pair: Pair) -> None:
    pair.writer.transport.pause_reading()  # the client stops reading
    sock = pair.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * 4_000_000
    assert pair.sink.write(big)
    assert pair.sink.buffered() > 0
    before = pair.sink.buffered()
    assert not pair.sink.write(b"more")
    assert pair.sink.buffered() == before


async def test_what_the_socket_does_not_take_follows_through_the_transport_in_order(
    pair: Pair,
) -> None:
    pair.writer.transport.pause_reading()
    sock = pair.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 16_000  # 4 MB: more than the socket takes at once
    assert pair.sink.write(big)
    assert pair.sink.buffered() > 0  # the socket took part of it; the transport holds the rest
    pair.writer.transport.resume_reading()
    framed = b"%x\r\n%b\r\n" % (len(big), big)
    assert await asyncio.wait_for(read_in_pieces(pair.reader, len(framed)), 10) == framed
    assert pair.sink.buffered() == 0
    assert pair.sink.write(b"data: after\n\n")
    after = b"d\r\ndata: after\n\n\r\n"
    assert await asyncio.wait_for(pair.reader.readexactly(len(after)), 5) == after


async def read_in_pieces(reader: asyncio.StreamReader, size: int) -> bytes:
    """`readexactly` of more than the reader's limit would stall: it pauses the transport."""
    received = bytearray()
    while len(received) < size:
        received += await reader.read(size - len(received))
    return bytes(received)


async def test_abort_closes_the_connection(pair: Pair) -> None:
    pair.sink.abort()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(pair.reader.readexactly(1), 5)
    assert not pair.sink.write(b"late")


def test_when_lost_calls_back_once_the_client_has_gone(pair: Pair) -> None:
    calls: list[str] = []
    pair.sink.when_lost(lambda: calls.append("first"))
    pair.sink.when_lost(None)  # the response that asked has ended
    pair.sink.when_lost(lambda: calls.append("second"))
    assert calls == []
    pair.sink.lost()
    pair.sink.lost()
    assert calls == ["second"]
    pair.sink.when_lost(lambda: calls.append("late"))  # asked after: told at once
    assert calls == ["second", "late"]


def test_sink_of_reads_the_scope() -> None:
    assert sink_of({"type": "http"}) is None
    assert sink_of({"extensions": {}}) is None
    sink = SocketSink(asyncio.Transport())  # type: ignore[arg-type]
    assert sink_of({"extensions": {SINK_EXTENSION: sink}}) is sink
