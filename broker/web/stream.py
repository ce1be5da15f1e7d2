"""One subscriber's Server-Sent Events response: replay, then live, until either side ends.

`EventStreamResponse` is a Starlette `Response` that writes the subscriber's queued events
until the subscriber is closed: by the broker, or by the connection when the client goes
(`SocketSink.when_lost`: noticed at once, with no second task waiting for it). The
subscriber is registered before the response starts (a full process's 503 is an ordinary
answer) and removed when it ends, whatever ends it.

Writes: every event queued since the last write goes out in one write. While the stream
idles it hands its socket's sink to its subscriber (`Subscriber.sink`, `server/sink.py`):
events routed to it are then written by one callback per event-loop turn, for all idle
streams, instead of by waking each stream's task. See `flusher.py` for why and when.

Replay writes go at the pace the socket drains: a page (`replay.REPLAY_PAGE` rows and about
`replay.REPLAY_PAGE_BYTES` at most) is written, and the next is read from PostgreSQL only once
the socket has taken it. A client that takes nothing for `STALL_SECONDS` is cut as a slow
consumer, so a reader that stops mid-replay holds one page and its queue, not the replay.

A stream opened with a token that expires (`Grant.valid_until`) ends then, with an `error`
event, so the client reconnects with a new token. HEAD on the stream is `EventStreamHead`:
the stream's status and headers, and no subscription.

Resume and history: the subscriber already queues live events when its `Replay` runs, and
the hub drops or skips the rows the replay sent (`hub.py` owns that rule); the stream only
writes the replay's pages, then the queue. Nothing is written, not even `connected`, before the
listener's first LISTEN, so a stream never misses a row committed after `connected`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, Protocol

import anyio
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..events import encode_connected, encode_error
from ..hub import HubCounters, Subscriber
from ..server.sink import SocketSink, sink_of
from ..store import DatabaseUnavailable
from ..subscriber import SLOW_CONSUMER

__all__ = [
    "REPLAY_LIMIT_REACHED",
    "TOKEN_EXPIRED",
    "EventStreamHead",
    "EventStreamResponse",
]

REPLAY_LIMIT_REACHED = "replay limit reached: reconnect to resume"
REPLAY_FAILED = "database unavailable: reconnect to resume"
TOKEN_EXPIRED = "token expired: reconnect with a new token"
CLOSE_TIMEOUT_SECONDS = 1.0
FIRST_LISTEN_TIMEOUT_SECONDS = 10.0
# A replay write that makes no progress (the socket takes not one byte) for this long cuts
# the stream as a slow consumer.
STALL_SECONDS = 5.0
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

log = structlog.get_logger(logger_name=__name__)


class Backlog(Protocol):
    """What a stream sends before live (`replay.Replay` for messages): pages of items, in
    order, at most `limit` + 1 in all, each encoded by `encode`."""

    limit: int
    after: int
    history: int

    def pages(self) -> AsyncGenerator[list[Any], None]: ...

    def encode(self, item: Any) -> bytes: ...


class StreamHub(Protocol):
    """What a stream needs of its feed's hub (`hub.Hub`, `feedhub.FeedHub`)."""

    counters: HubCounters

    def unsubscribe(self, subscriber: Subscriber) -> None: ...


class EventStreamHead(Response):
    """HEAD of a stream: its status and headers, no body, and nothing held."""

    media_type = "text/event-stream"

    def __init__(self) -> None:
        # Not Response.__init__: a Content-Length: 0 would misstate the stream's length.
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.body = b""


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        hub: StreamHub,
        subscriber: Subscriber,
        replay: Backlog | None,
        *,
        listening: asyncio.Event,
        retry_ms: int,
        valid_until: float | None = None,
        connected: bytes | None = None,
    ) -> None:
        # Not Response.__init__: with no body it would declare Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.hub = hub
        self.subscriber = subscriber
        self.replay = replay
        self.listening = listening
        self.retry_ms = retry_ms
        self.valid_until = valid_until
        # The first event; None: the messages feed's (`events.encode_connected`).
        self.connected = connected
        self.events_sent = 0
        self._sink: SocketSink | None = None  # the socket (server/sink.py)
        self.replayed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, replay = self.subscriber, self.replay
        started = time.monotonic()
        log.debug(
            "stream_opened",
            channels=subscriber.channels,
            robot_id=subscriber.robot_id,
            last_event_id=None if replay is None or replay.history else replay.after,
            history=None if replay is None else replay.history or None,
        )
        expiry: asyncio.TimerHandle | None = None
        watcher: asyncio.Future[None] | None = None
        # Everything from here on is inside the try: whatever raises, the subscription is
        # released (a token's exp past the float range once raised before it and left one
        # counted for good).
        try:
            if self.valid_until is not None:
                delay = max(0.0, self.valid_until - time.time())
                expiry = asyncio.get_running_loop().call_later(
                    delay, subscriber.close, TOKEN_EXPIRED
                )
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            self._sink = sink = sink_of(scope)
            if sink is not None:
                sink.when_lost(subscriber.close)
            else:  # not our server: a task waits to hear the client go
                watcher = asyncio.ensure_future(self._watch_disconnect(receive))
            await self._pump(send)
        finally:
            if self._sink is not None:
                self._sink.when_lost(None)
            if watcher is not None:
                watcher.cancel()
            if expiry is not None:
                expiry.cancel()
            self.hub.unsubscribe(subscriber)
            subscriber.close()
            log.debug(
                "stream_closed",
                channels=subscriber.channels,
                robot_id=subscriber.robot_id,
                duration_s=round(time.monotonic() - started, 3),
                events=self.events_sent + subscriber.direct_sent,
                replayed=self.replayed,
                reason=subscriber.close_reason or "client",
            )

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.subscriber.close()

    async def _pump(self, send: Send) -> None:
        subscriber = self.subscriber
        with self._until_closed():
            with anyio.move_on_after(FIRST_LISTEN_TIMEOUT_SECONDS):
                await self.listening.wait()
            if not self.listening.is_set():
                subscriber.close(REPLAY_FAILED)
            connected = self.connected
            if connected is None:
                connected = encode_connected(
                    subscriber.sessions, subscriber.robot_id, self.retry_ms
                )
            await self._write(send, connected)
            if self.replay is not None:
                try:
                    await self._replay(send, self.replay)
                except DatabaseUnavailable:
                    subscriber.close(REPLAY_FAILED)
        while not subscriber.closed:
            # While the stream idles with nothing queued, the hub may write to the socket
            # itself; never while this task is busy, which keeps events in order.
            subscriber.sink = self._sink
            await subscriber.wait()  # returns once closed, too
            subscriber.sink = None
            events = subscriber.take()
            if events:
                self.events_sent += len(events)
                with self._until_closed():
                    await self._write(send, b"".join(event.data for event in events))
                latency = self.hub.counters.delivery_latency
                latency.observe_since(event.born for event in events if event.born)
        await self._finish(send)

    @contextmanager
    def _until_closed(self) -> Iterator[None]:
        """A scope that closing the subscriber cancels, for what may wait on the client or
        the listener. Only while the stream is busy: an idle stream holds none."""
        subscriber = self.subscriber
        with anyio.CancelScope() as scope:
            subscriber.on_close = scope.cancel
            if subscriber.closed:
                scope.cancel()
            try:
                yield
            finally:
                subscriber.on_close = None

    async def _replay(self, send: Send, replay: Backlog) -> None:
        """Send the rows the client missed (or its history). At the replay limit, closes
        the subscriber so the client reconnects from the last row it got."""
        async with aclosing(replay.pages()) as pages:
            async for page in pages:
                room = replay.limit - self.replayed
                over_limit = len(page) > room
                page = page[:room]
                if page:
                    if not await self._write_drained(send, b"".join(map(replay.encode, page))):
                        self.hub.counters.slow_consumer_disconnects += 1
                        self.subscriber.close(SLOW_CONSUMER)
                        break
                    self.replayed += len(page)
                    self.hub.counters.replayed_events += len(page)
                    self.events_sent += len(page)
                if over_limit:
                    self.subscriber.close(REPLAY_LIMIT_REACHED)
                    break

    async def _write_drained(self, send: Send, events: bytes) -> bool:
        """Write `events`, then wait until the socket has taken them (an empty body message
        returns once uvicorn's flow control lets writing resume: `server/hooks.py`). False if
        the socket takes not one byte for `STALL_SECONDS`: the client has stopped reading."""
        for body in (events, b""):
            while True:
                buffered = self._buffered()
                with anyio.move_on_after(STALL_SECONDS):
                    await self._write(send, body)
                    break
                if self._buffered() >= buffered:
                    return False
        return True

    def _buffered(self) -> int:
        """Bytes written to the socket that the client has yet to take."""
        return 0 if self._sink is None else self._sink.buffered()

    async def _finish(self, send: Send) -> None:
        """Tell the client why the stream ends, if the broker ends it, then end the body.
        A client that takes neither in time is cut off: abort, since closing would wait for
        it to read what is buffered, holding that memory for as long as it likes."""
        reason = self.subscriber.close_reason
        with anyio.move_on_after(CLOSE_TIMEOUT_SECONDS) as ending:
            if reason is not None:
                await self._write(send, encode_error(reason))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if ending.cancelled_caught and self._sink is not None:
            self._sink.abort()

    @staticmethod
    async def _write(send: Send, body: bytes) -> None:
        message: dict[str, Any] = {"type": "http.response.body", "body": body, "more_body": True}
        await send(message)
