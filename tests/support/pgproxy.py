"""A TCP proxy in front of the test cluster that can keep a broker's listener out.

The broker's listening connection announces itself as `application_name=pgsse-listener` in its
startup packet; the pool's connections do not. While `listener_blocked` is set the proxy closes
every listener connection right after reading that packet, and forwards all others, so a test
can hold a broker with a working pool and no listener: before its first LISTEN, or during an
outage of the listener alone. `cut()` closes every connection it forwards without a word from
PostgreSQL, as a failed network path or a proxy's crash would. Everything else is real:
PostgreSQL, the broker, the bytes.

The proxy runs its own event loop in a thread, so tests that block theirs (sync psycopg,
`BrokerProcess.wait_until`) never stall the broker's queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from broker.feeds.listener import APPLICATION_NAME

LISTENER_MARK = b"application_name\x00" + APPLICATION_NAME.encode() + b"\x00"


class PostgresProxy:
    """Forwards 127.0.0.1:`port` to the cluster's Unix socket in `socket_dir`."""

    def __init__(self, socket_dir: Path, dbname: str = "postgres") -> None:
        self.dbname = dbname
        self.upstream = str(socket_dir / ".s.PGSQL.5432")
        self.listener_blocked = threading.Event()
        self.refused = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._forwarded: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        # No SSL or GSS negotiation: the startup packet is the first thing a client sends.
        return (
            f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"
            "?sslmode=disable&gssencmode=disable"
        )

    def to(self, url: str) -> str:
        """The proxy's URL for the database `url` names."""
        return urlunsplit(urlsplit(self.url)._replace(path=urlsplit(url).path))

    def start(self) -> PostgresProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def cut(self) -> int:
        """Close every forwarded connection at once, both ends; how many there were. The
        client reads the end of its stream with no error message before it."""

        async def cut() -> int:
            forwarded = list(self._forwarded)
            for client, upstream in forwarded:
                client.transport.abort()
                upstream.transport.abort()
            return len(forwarded)

        return asyncio.run_coroutine_threadsafe(cut(), self._loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(4)
            packet = head + await reader.readexactly(struct.unpack("!I", head)[0] - 4)
            if LISTENER_MARK in packet and self.listener_blocked.is_set():
                self.refused += 1
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        up_writer.write(packet)
        pair = (writer, up_writer)
        self._forwarded.add(pair)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._forwarded.discard(pair)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
