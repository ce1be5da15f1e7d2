"""broker.web.stream in process: an `EventStreamResponse` on the broker's protocol with a real
hub and socket. End to end over a real broker: tests/system/test_stream.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.events import Message
from broker.flusher import Flusher
from broker.hub import Hub
from broker.server.sink import SINK_EXTENSION
from broker.subscriber import Subscriber
from broker.web.stream import EventStreamResponse
from tests.support.served import protocol_server
from tests.support.sse import SSEClient


@dataclass
class StreamApp:
    """Every request is a stream of session "a" on `hub`; `ended` is set as one ends."""

    hub: Hub = field(default_factory=lambda: Hub(max_subscribers=10, queue_size=10))
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    foreign: bool = False  # as under a server without our sink

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.foreign:
            scope["extensions"].pop(SINK_EXTENSION)
        subscriber = self.hub.subscribe("a", None)
        response = EventStreamResponse(
            self.hub, subscriber, None, listening=self.listening, retry_ms=3000
        )
        try:
            await response(scope, receive, send)
        finally:
            self.ended.set()


@dataclass
class InProcess:
    app: StreamApp
    port: int

    async def open(self) -> SSEClient:
        client = await SSEClient.open(self.port, path="/")
        assert client.status == 200 and client.headers["content-type"].startswith("text/event")
        return client

    async def connected(self) -> tuple[SSEClient, Subscriber]:
        """A stream read up to `connected`, the listener being up, and its subscriber."""
        self.app.listening.set()
        client = await self.open()
        await client.events_until(lambda e: e.type == "connected")
        (subscriber,) = self.app.hub.subscribers()
        return client, subscriber


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    app = StreamApp()
    app.hub.on_idle_ready = Flusher(
        asyncio.get_running_loop(), app.hub.counters.delivery_latency
    ).mark
    async with protocol_server(app) as (port, _state):
        yield InProcess(app, port)


def row(id_: int) -> Message:
    return Message(id_, "a", None, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


async def test_in_process_nothing_is_written_before_the_first_listen(in_process: InProcess) -> None:
    client = await in_process.open()
    with pytest.raises(TimeoutError):
        await client.event(timeout=0.3)
    in_process.app.listening.set()
    connected = await client.event()
    assert connected.retry == 3000 and connected.type == "connected"


async def test_in_process_an_idle_stream_is_written_through_its_sink(
    in_process: InProcess,
) -> None:
    client, subscriber = await in_process.connected()
    in_process.app.hub.publish(row(1))
    in_process.app.hub.publish(row(2))
    in_process.app.hub.heartbeat()
    events = await client.events_until(lambda e: e.type == "heartbeat")
    assert [e.id for e in events] == ["1", "2", None]
    assert subscriber.direct_sent == 3  # none woke the stream's task
    assert in_process.app.hub.counters.delivery_latency.count == 2


async def test_in_process_a_closed_subscriber_sends_its_reason_and_ends(
    in_process: InProcess,
) -> None:
    client, subscriber = await in_process.connected()
    subscriber.close("going away: reconnect")
    error = await client.event()
    assert error.json == {"type": "error", "error": "going away: reconnect"}
    with pytest.raises(EOFError):
        await client.event()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0


async def test_in_process_a_client_that_goes_is_unsubscribed(in_process: InProcess) -> None:
    before = len(asyncio.all_tasks())
    client, subscriber = await in_process.connected()
    # The connection tells the stream its client went: no second task per stream waits for it.
    assert len(asyncio.all_tasks()) == before + 1
    assert subscriber.on_close is None  # an idle stream holds no cancel scope either
    await client.close()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0
    assert subscriber.closed and subscriber.close_reason is None


async def test_in_process_under_another_server_a_task_hears_the_client_go(
    in_process: InProcess,
) -> None:
    in_process.app.foreign = True
    before = len(asyncio.all_tasks())
    client, subscriber = await in_process.connected()
    assert len(asyncio.all_tasks()) == before + 2  # the request's, and the watcher
    await client.close()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0 and subscriber.closed
    assert len(asyncio.all_tasks()) == before


async def test_an_error_opening_the_stream_releases_its_subscription() -> None:
    # An exp past the float range (before `MAX_TOKEN_SECONDS`) raised before the stream's
    # `try`: a 500 and a subscription counted for good. Whatever raises now, it is released.
    hub = Hub(max_subscribers=10, queue_size=10)
    subscriber = hub.subscribe("a", None)
    response = EventStreamResponse(
        hub, subscriber, None, listening=asyncio.Event(), retry_ms=3000, valid_until=10**400
    )

    async def never(*_: Any) -> Any:
        raise AssertionError("nothing is received or sent")

    with pytest.raises(OverflowError):
        await response({"type": "http", "extensions": {}}, never, never)
    assert len(hub) == 0 and hub.channels() == {} and subscriber.closed
