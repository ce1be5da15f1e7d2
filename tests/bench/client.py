"""The load client: many SSE streams over raw asyncio sockets, in one or more processes.

Each stream is an `asyncio.Protocol` speaking HTTP/1.1 itself: it sends the GET, reads the
response head, undoes chunked transfer coding and splits the body into SSE frames at blank
lines, as a browser's EventSource does. A `message` frame's `id:` and JSON `data:` are checked
against each other and against the stream's session, and the receive time (`time.monotonic()`,
taken once per socket read) is recorded per (stream, id). When the broker ends a stream (slow
consumer, replay limit) the stream reconnects with `Last-Event-ID`, like EventSource, a bounded
number of times.

`LoadClient` spreads streams over worker processes (multiprocessing, spawn) and drives them
through a pipe: open, progress, churn, close; `close` returns every stream's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import resource
import socket
import struct
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import quote

import orjson

from tests.support.chunked import ChunkedDecoder

OPEN_CONCURRENCY = 256
CONNECT_TIMEOUT = 20.0
MAX_RECONNECTS = 20
MAX_HEAD_BYTES = 16_384
MESSAGE_PREFIX = b'{"type":"message","data":{"id":"'
PREFIX_LENGTH = len(MESSAGE_PREFIX)
QUOTE = ord('"')


@dataclass(frozen=True)
class StreamSpec:
    session_id: str | None
    robot_id: str | None = None
    last_event_id: int | None = None


@dataclass
class StreamRecord:
    """What one stream saw, across its reconnects."""

    session_id: str | None
    ids: array[int] = field(default_factory=lambda: array("q"))
    times: array[float] = field(default_factory=lambda: array("d"))
    connected_at: float = 0.0
    connects: int = 0
    reconnects: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    heartbeats: int = 0
    malformed: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    last_id: int = 0


class Stream:
    """One logical subscriber: a connection, and its reconnections with `Last-Event-ID`."""

    def __init__(
        self,
        client: WorkerClient,
        spec: StreamSpec,
        *,
        verify: bool,
        reconnect: bool,
    ) -> None:
        self.client = client
        self.spec = spec
        self.verify = verify
        self.reconnect = reconnect
        self.record = StreamRecord(spec.session_id, last_id=spec.last_event_id or 0)
        self.session_key = (
            b'"sessionId":' + orjson.dumps(spec.session_id) if spec.session_id else None
        )
        self.connection: SSEConnection | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.active = True

    def request(self) -> bytes:
        params = []
        if self.spec.session_id is not None:
            params.append("sessionId=" + quote(self.spec.session_id, safe=""))
        if self.spec.robot_id is not None:
            params.append("robotId=" + quote(self.spec.robot_id, safe=""))
        target = "/api/sse/messages" + ("?" + "&".join(params) if params else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {self.client.host}:{self.client.port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        resume = self.record.last_id or self.spec.last_event_id
        if resume:
            lines.append(f"Last-Event-ID: {resume}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.record.connects += 1
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: SSEConnection(self), self.client.host, self.client.port
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            self.record.errors[f"connect: {type(exc).__name__}"] += 1
            self.closed()

    # Called by the connection.

    def on_status(self, status: int) -> None:
        self.record.statuses[status] += 1

    def on_connected(self, now: float) -> None:
        if not self.record.connected_at:
            self.record.connected_at = now
        if not self.connected.done():
            self.connected.set_result(True)

    def on_message(self, event_id: int, id_text: bytes, data: bytes, now: float) -> None:
        record = self.record
        if self.verify and not self._valid(event_id, id_text, data):
            record.malformed += 1
        if event_id <= record.last_id:
            if event_id in set(record.ids[-1000:]):
                record.duplicates += 1
            else:
                record.out_of_order += 1
        else:
            record.last_id = event_id
        record.ids.append(event_id)
        record.times.append(now)

    def _valid(self, event_id: int, id_text: bytes, data: bytes) -> bool:
        """A message's JSON says type `message`, the frame's id and the stream's session.

        Checked on the bytes first, in the broker's key order (a session key cannot occur
        unescaped inside a JSON string value); anything else gets a full parse.
        """
        if (
            data.startswith(MESSAGE_PREFIX)
            and data.startswith(id_text, PREFIX_LENGTH)
            and data[PREFIX_LENGTH + len(id_text)] == QUOTE
            and (self.session_key is None or self.session_key in data)
        ):
            return True
        try:
            body = orjson.loads(data)
            inner = body["data"]
            return bool(
                body["type"] == "message"
                and inner["id"] == str(event_id)
                and (self.spec.session_id is None or inner["sessionId"] == self.spec.session_id)
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False

    def on_event(self, body: dict[str, Any], now: float) -> None:
        kind = body.get("type")
        if kind == "connected":
            self.on_connected(now)
        elif kind == "heartbeat":
            self.record.heartbeats += 1
        elif kind == "error":
            self.record.errors[str(body.get("error"))] += 1
        else:
            self.record.malformed += 1

    def closed(self) -> None:
        """The connection ended (or never opened)."""
        self.connection = None
        if not self.active:
            return
        if not self.connected.done():
            self.connected.set_result(False)
        if self.reconnect and self.record.reconnects < MAX_RECONNECTS:
            self.record.reconnects += 1
            delay = 0.2 + random.random() * 0.3
            asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if self.active:
            self.client.spawn(self.connect())

    def close(self, abort: bool = False) -> None:
        self.active = False
        connection = self.connection
        if connection is not None and connection.transport is not None:
            if abort:
                # SO_LINGER 0: close() sends RST, as a killed browser tab's socket may.
                sock = connection.transport.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.transport.abort()
            else:
                connection.transport.close()


class SSEConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: response head, chunked decoding, SSE frames."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.decoder = ChunkedDecoder()
        self.text = b""  # de-chunked bytes of an incomplete SSE frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.stream.connection = self
        transport.write(self.stream.request())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stream.closed()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD_BYTES:
                    self._fail("head too long")
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            if not self._parse_head(head):
                return
            self.in_body = True
            if not data:
                return
        if self.chunked:
            # Fast path: the read is exactly one whole chunk (one write of the broker).
            line_end = data.find(b"\r\n")
            if self.decoder.idle and 0 < line_end < 9:
                try:
                    size = int(data[:line_end], 16)
                except ValueError:
                    size = 0
                start = line_end + 2
                if size and len(data) == start + size + 2 and data.endswith(b"\r\n"):
                    self._feed(data[start : start + size], now)
                    return
            data = self.decoder.feed(data)
        if data:
            self._feed(data, now)

    def _parse_head(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self._fail("bad status line")
            return False
        self.stream.on_status(status)
        if status != 200:
            self._fail(f"status {status}")
            return False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "transfer-encoding":
                self.chunked = "chunked" in value.lower()
        return True

    def _fail(self, reason: str) -> None:
        self.stream.record.errors[reason] += 1
        if self.transport is not None:
            self.transport.close()

    def _feed(self, payload: bytes, now: float) -> None:
        text = self.text + payload if self.text else payload
        # Fast path: exactly one `id: N` / `data: ...` frame.
        if text.startswith(b"id: ") and text.find(b"\n\n") == len(text) - 2:
            line_end = text.find(b"\n")
            if (
                text.startswith(b"data: ", line_end + 1)
                and text.find(b"\n", line_end + 1) == len(text) - 2
                and b"\r" not in text
                and text[4:line_end].isdigit()
            ):
                self.text = b""
                id_text = text[4:line_end]
                self.stream.on_message(int(id_text), id_text, text[line_end + 7 : -2], now)
                return
        if b"\r" in text:
            # SSE allows CRLF and CR line ends; this broker sends LF, so this is the slow path.
            keep = text.endswith(b"\r")
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep:
                text = text[:-1] + b"\r"
        if b"\n\n" not in text:
            self.text = text
            return
        frames = text.split(b"\n\n")
        self.text = frames.pop()
        stream = self.stream
        for frame in frames:
            # The common case, `id: N\ndata: {...}`, without a general line split.
            if frame.startswith(b"id: "):
                line_end = frame.find(b"\n")
                if (
                    line_end > 4
                    and frame.startswith(b"data: ", line_end + 1)
                    and frame.find(b"\n", line_end + 1) < 0
                ):
                    id_text = frame[4:line_end]
                    if id_text.isdigit():
                        stream.on_message(int(id_text), id_text, frame[line_end + 7 :], now)
                        continue
            self._frame(frame.lstrip(b"\n"), now)

    def _frame(self, frame: bytes, now: float) -> None:
        """Any frame, by the SSE field rules: `data:` lines joined, `id:`, `retry:`, comments."""
        data: list[bytes] = []
        event_id: bytes | None = None
        for line in frame.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"id" and b"\0" not in value:
                event_id = value
        if not data:
            return
        joined = b"\n".join(data)
        try:
            body = orjson.loads(joined)
        except orjson.JSONDecodeError:
            self.stream.record.malformed += 1
            return
        if isinstance(body, dict) and body.get("type") == "message" and event_id is not None:
            if event_id.isdigit():
                self.stream.on_message(int(event_id), event_id, joined, now)
            else:
                self.stream.record.malformed += 1
        elif isinstance(body, dict):
            self.stream.on_event(body, now)
        else:
            self.stream.record.malformed += 1


class WorkerClient:
    """The streams of one worker process, driven by commands from its pipe."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.streams: list[Stream] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open(
        self, specs: list[StreamSpec], verify: bool, reconnect: bool, timeout: float
    ) -> dict[str, Any]:
        """Open `specs` (OPEN_CONCURRENCY at a time); wait for each one's `connected` event."""
        limit = asyncio.Semaphore(OPEN_CONCURRENCY)
        started = time.monotonic()

        async def one(spec: StreamSpec) -> bool:
            async with limit:
                stream = Stream(self, spec, verify=verify, reconnect=reconnect)
                self.streams.append(stream)
                await stream.connect()
                try:
                    return bool(await asyncio.wait_for(asyncio.shield(stream.connected), 30))
                except TimeoutError:
                    return False

        results = await asyncio.wait_for(
            asyncio.gather(*(one(spec) for spec in specs), return_exceptions=True), timeout
        )
        opened = sum(1 for result in results if result is True)
        return {"opened": opened, "failed": len(specs) - opened, "seconds": _since(started)}

    def progress(self, targets: dict[str, int], default: int) -> dict[str, Any]:
        """How many streams have not yet received the last id they should get."""
        lagging = 0
        for stream in self.streams:
            want = targets.get(stream.spec.session_id or "", default)
            if want and stream.record.last_id < want:
                lagging += 1
        events = sum(len(stream.record.ids) for stream in self.streams)
        return {"lagging": lagging, "events": events, "streams": len(self.streams)}

    async def churn(
        self,
        sessions: list[str],
        rate: float,
        duration: float,
        lifetime: tuple[float, float],
        resume_share: float,
        abort_share: float,
        seed: int,
    ) -> dict[str, Any]:
        """Open a stream every 1/rate s for `duration` s; each lives `lifetime` s, then ends
        (some by RST); some resume with `Last-Event-ID`. Waits for all to end."""
        chooser = random.Random(seed)
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = int(rate * duration)
        churned: list[Stream] = []
        latest = 0

        async def life(stream: Stream, seconds: float, abort: bool) -> None:
            await stream.connect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.connected), 10)
            await asyncio.sleep(seconds)
            stream.close(abort=abort)

        for index in range(total):
            due = started + index / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            resume = latest - 20 if latest > 20 and chooser.random() < resume_share else None
            spec = StreamSpec(chooser.choice(sessions), last_event_id=resume)
            stream = Stream(self, spec, verify=True, reconnect=False)
            churned.append(stream)
            seconds = chooser.uniform(*lifetime)
            self.spawn(life(stream, seconds, chooser.random() < abort_share))
            latest = max([latest, *(s.record.last_id for s in churned[-10:])])
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=lifetime[1] + 15)
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        for stream in churned:
            statuses.update(stream.record.statuses)
            errors.update(stream.record.errors)
        return {
            "streams": total,
            "connected": sum(1 for s in churned if s.record.connected_at),
            "events": sum(len(s.record.ids) for s in churned),
            "statuses": {str(k): v for k, v in statuses.items()},
            "errors": dict(errors),
            "malformed": sum(s.record.malformed for s in churned),
            "unfinished_tasks": len(self.tasks),
            "seconds": _since(started, loop.time()),
        }

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


def _since(start: float, now: float | None = None) -> float:
    return round((time.monotonic() if now is None else now) - start, 3)


def _worker(pipe: Connection, host: str, port: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(pipe, host, port))


async def _serve(pipe: Connection, host: str, port: int) -> None:
    """Answer the pipe's commands until `close`."""
    client = WorkerClient(host, port)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def on_command() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except (EOFError, OSError):  # the bench process is gone: close everything and exit
            loop.remove_reader(pipe.fileno())
            commands.put_nowait(("exit", {}))

    loop.add_reader(pipe.fileno(), on_command)
    # uvloop makes a watched descriptor non-blocking; answers (records) are large, and
    # multiprocessing's send expects blocking writes.
    os.set_blocking(pipe.fileno(), True)
    started_cpu = time.process_time()
    while True:
        command, args = await commands.get()
        if command == "open":
            pipe.send(await client.open(**args))
        elif command == "progress":
            pipe.send(client.progress(**args))
        elif command == "churn":
            pipe.send(await client.churn(**args))
        elif command == "cpu":
            pipe.send(time.process_time() - started_cpu)
        elif command == "exit":
            client.close()
            return
        elif command == "close":
            client.close()
            await asyncio.sleep(0.2)
            records = [stream.record for stream in client.streams]
            pipe.send({"records": records, "cpu_seconds": time.process_time() - started_cpu})
            loop.remove_reader(pipe.fileno())
            return


class LoadClient:
    """SSE streams spread round robin over `processes` worker processes."""

    def __init__(self, port: int, processes: int = 2, host: str = "127.0.0.1") -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for _ in range(max(1, processes)):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs, host, port), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(mine)
            self.processes.append(process)

    def _all(self, command: str, args: list[dict[str, Any]], timeout: float) -> list[Any]:
        for pipe, arg in zip(self.pipes, args, strict=True):
            pipe.send((command, arg))
        answers = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"client worker did not answer {command!r} in {timeout}s")
            answers.append(pipe.recv())
        return answers

    def open(
        self,
        specs: list[StreamSpec],
        *,
        verify: bool = True,
        reconnect: bool = True,
        timeout: float = 180.0,
    ) -> dict[str, Any]:
        """Open the streams; returns how many got their `connected` event, and how fast."""
        shares: list[list[StreamSpec]] = [[] for _ in self.pipes]
        for index, spec in enumerate(specs):
            shares[index % len(shares)].append(spec)
        args = [
            {"specs": share, "verify": verify, "reconnect": reconnect, "timeout": timeout}
            for share in shares
        ]
        started = time.monotonic()
        answers = self._all("open", args, timeout + 10)
        return {
            "opened": sum(a["opened"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "seconds": round(time.monotonic() - started, 3),
        }

    def progress(self, targets: dict[str, int], default: int = 0) -> dict[str, int]:
        args = [{"targets": targets, "default": default} for _ in self.pipes]
        answers = self._all("progress", args, 30)
        return {key: sum(a[key] for a in answers) for key in ("lagging", "events", "streams")}

    def wait_delivered(
        self, targets: dict[str, int], default: int = 0, timeout: float = 30.0
    ) -> tuple[bool, float]:
        """Wait until every stream got its target id; (all did, seconds waited)."""
        started = time.monotonic()
        while True:
            if self.progress(targets, default)["lagging"] == 0:
                return True, time.monotonic() - started
            if time.monotonic() - started > timeout:
                return False, time.monotonic() - started
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        return float(sum(self._all("cpu", [{} for _ in self.pipes], 30)))

    def churn(self, **kwargs: Any) -> dict[str, Any]:
        """Run `WorkerClient.churn` in every worker at rate / processes each; merged."""
        count = len(self.pipes)
        args = [
            {**kwargs, "rate": kwargs["rate"] / count, "seed": kwargs.get("seed", 1) + index}
            for index in range(count)
        ]
        answers = self._all("churn", args, kwargs["duration"] + kwargs["lifetime"][1] + 60)
        merged: dict[str, Any] = {}
        for answer in answers:
            for key, value in answer.items():
                if isinstance(value, dict):
                    bucket = merged.setdefault(key, {})
                    for name, n in value.items():
                        bucket[name] = bucket.get(name, 0) + n
                elif key == "seconds":
                    merged[key] = max(merged.get(key, 0), value)
                else:
                    merged[key] = merged.get(key, 0) + value
        return merged

    def close(self, timeout: float = 60.0) -> tuple[list[StreamRecord], float]:
        """Close every stream; every stream's record and the workers' CPU seconds."""
        answers = self._all("close", [{} for _ in self.pipes], timeout)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
        records = [record for answer in answers for record in answer["records"]]
        return records, sum(answer["cpu_seconds"] for answer in answers)

    def terminate(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
