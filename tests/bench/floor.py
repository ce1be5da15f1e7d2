"""The floor of relaying a row on this machine: what any broker in Python must spend per row.

A process on the broker's CPU, with the broker's loop (uvloop): one LISTEN connection whose
socket reader reads every notification at each wake-up, parses each payload (orjson), encodes
it as an SSE `message` event and writes the events to one TCP client, in that same callback.
No hub, journal, queue, flusher or HTTP. The bench process drains the client socket in a
thread. Its CPU per row, measured in the same minute as the broker's, tells which part of the
broker's cost is its own and which part is the machine's (system calls, loopback TCP, wake-ups).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import threading
from multiprocessing.connection import Connection
from typing import Any

import orjson
import psycopg
from psycopg import sql

from broker.signing import SIGNATURE_CHARS
from tests.bench.harness import BROKER_CPU, cpu_times, pinning_available


def _relay(url: str, channel: str, pipe: Connection) -> None:
    import uvloop

    if pinning_available():
        os.sched_setaffinity(0, {BROKER_CPU})
    uvloop.run(_serve(url, channel, pipe))


async def _serve(url: str, channel: str, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    listener = socket.create_server(("127.0.0.1", 0))
    pipe.send(listener.getsockname()[1])
    client, _ = await loop.sock_accept(listener)
    writer = (await loop.connect_accepted_socket(asyncio.Protocol, client))[0]
    pgconn = conn.pgconn

    def readable() -> None:
        pgconn.consume_input()
        events = []
        while (notify := pgconn.notifies()) is not None:
            data = orjson.loads(notify.extra[SIGNATURE_CHARS:])  # past the trigger's signature
            body = {"type": "message", "data": data, "timestamp": "2026-01-01T00:00:00.000Z"}
            events.append(b"id: %d\ndata: " % int(data["id"]) + orjson.dumps(body) + b"\n\n")
        if events:
            writer.write(b"".join(events))

    loop.add_reader(conn.fileno(), readable)
    await loop.run_in_executor(None, pipe.recv)  # until told to stop


class FloorRelay:
    """`with FloorRelay(url, channel) as floor:` rows committed meanwhile are relayed;
    `floor.cpu_seconds()` is the relaying process's CPU time so far."""

    def __init__(self, url: str, channel: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, theirs = context.Pipe()
        self._process: Any = context.Process(
            target=_relay, args=(url, channel, theirs), daemon=True
        )
        self._sink: socket.socket | None = None
        self._drain = threading.Thread(target=self._read, name="floor-sink", daemon=True)
        self.events = 0  # events received (each ends with the one blank line of its frame)

    def __enter__(self) -> FloorRelay:
        self._process.start()
        if not self._pipe.poll(30):
            raise RuntimeError("floor relay did not start")
        self._sink = socket.create_connection(("127.0.0.1", self._pipe.recv()), timeout=30)
        self._drain.start()
        return self

    def _read(self) -> None:
        assert self._sink is not None
        tail = b""
        while chunk := self._sink.recv(1 << 16):
            self.events += (tail + chunk).count(b"\n\n")
            tail = chunk[-1:] if chunk.endswith(b"\n") else b""

    def cpu_seconds(self) -> float:
        return sum(cpu_times(self._process.pid))

    def __exit__(self, *exc: object) -> None:
        self._pipe.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._drain.join(10)
        if self._sink is not None:
            self._sink.close()
