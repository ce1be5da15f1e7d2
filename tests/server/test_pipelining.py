"""broker.server.pipelining in-process, through the broker's protocol on a real socket: requests
pipelined behind a running response are held and run in turn, and every one of them hears
the client go."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from broker.server.pipelining import MAX_HELD_BYTES
from tests.support.served import Client, Served, get, serving


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as served:
        yield served


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
