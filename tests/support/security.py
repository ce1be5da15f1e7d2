"""Helpers for the security tests: tokens, raw HTTP requests, and the log scan for secrets.

Tokens are minted here with PyJWT directly, not with `broker.web.auth`, so the tests check the
contract (what an app backend would sign) rather than the broker's own minting. Every token
and secret made here is remembered, and `no_secret_in_logs` (an autouse fixture for the
modules that import it) fails a test whose broker logs printed any of them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient

# Every token and secret handed to a broker during the run: none may appear in a log line.
SENSITIVE: set[str] = set()


def new_secret(nbytes: int = 32) -> str:
    secret = secrets.token_urlsafe(nbytes)
    SENSITIVE.add(secret)
    return secret


def mint(
    secret: str,
    sessions: list[str] | str,
    robots: list[str] | str | None = "*",
    publish: bool | None = None,
    ttl: float = 3600,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token as an app backend would sign it; `None` leaves a claim out."""
    now = int(time.time())
    payload: dict[str, Any] = {"sessions": sessions, "iat": now, "exp": now + int(ttl), **claims}
    if robots is not None:
        payload["robots"] = robots
    if publish is not None:
        payload["publish"] = publish
    token = jwt.encode(payload, secret, algorithm=algorithm)
    remember(token)
    return token


def unsigned(sessions: list[str] | str) -> str:
    """An `alg: none` token, which must never be accepted."""
    token = jwt.encode(
        {"sessions": sessions, "exp": int(time.time()) + 3600}, None, algorithm="none"
    )
    remember(token)
    return token


def remember(token: str) -> None:
    SENSITIVE.add(token)
    parts = token.split(".")
    if len(parts) == 3 and len(parts[2]) >= 16:
        SENSITIVE.add(parts[2])  # the signature alone is token text too


def leaked(log_text: str) -> list[str]:
    """Each sensitive string found in `log_text`, shortened for the failure message."""
    return [value[:12] + "..." for value in SENSITIVE if value in log_text]


def assert_no_secret_in(paths: list[Path]) -> int:
    """Fail if any file holds a sensitive string; returns the number of lines scanned."""
    lines = 0
    for path in paths:
        text = path.read_text(errors="replace")
        lines += text.count("\n")
        found = leaked(text)
        assert not found, f"{path.name} logs token or secret text: {found}"
    return lines


@contextmanager
def module_broker(database_url: str, log_path: Path, **env: str) -> Iterator[BrokerProcess]:
    """A broker shared by a test module's tests; its log is scanned for secrets at the end."""
    settings = {
        "DATABASE_URL": database_url,
        "BROKER_MIGRATE": "false",
        "BROKER_LOG_FORMAT": "json",
        **env,
    }
    broker = BrokerProcess(settings, log_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        assert_no_secret_in([log_path])


@pytest.fixture(autouse=True)
def no_secret_in_logs(tmp_path: Path) -> Iterator[None]:
    """After each test (and after `start_broker` stopped its brokers, since an autouse
    fixture is set up first and torn down last), scan every broker log of the test."""
    yield
    assert_no_secret_in(sorted(tmp_path.glob("*.log")))


@dataclass
class Answer:
    """A complete, finite HTTP response."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")


async def request(
    port: int,
    method: str = "GET",
    target: str = "/",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> Answer:
    """One request on a fresh connection (`Connection: close`); the whole answer, read
    until the server closes. Bounded by `timeout`: a hang raises `TimeoutError`."""

    async def exchange() -> Answer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        return parse_answer(raw)

    return await asyncio.wait_for(exchange(), timeout)


def parse_answer(raw: bytes) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = Answer(int(status_line.split()[1]))
    for line in header_lines:
        name, _, value = line.partition(":")
        answer.headers[name.strip().lower()] = value.strip()
    if answer.headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        rest = body
    answer.body = rest
    return answer


async def open_stream(
    port: int,
    params: dict[str, str] | list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    local_host: str | None = None,
    timeout: float = 10.0,
) -> SSEClient:
    """`SSEClient.open`, optionally from another loopback source address (127.0.0.2, ...)."""
    if local_host is None:
        return await SSEClient.open(port, params=params, headers=headers, timeout=timeout)
    from urllib.parse import urlencode

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(local_host, 0)), timeout
    )
    target = "/api/sse/messages" + ("?" + urlencode(params) if params else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    client = SSEClient(reader, writer)
    await asyncio.wait_for(client._read_head(), timeout)
    return client


async def refused(client: SSEClient) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of a stream request that must not become a stream."""
    assert not client.headers.get("content-type", "").startswith("text/event-stream")
    body = json.loads(await client.body(timeout=5))
    await client.close()
    return client.status, client.headers, body


class RawClient:
    """One blocking socket driven byte by byte, for what a well-behaved client never sends:
    pipelined requests, trickled bodies, a socket closed by FIN or by RST. Every read is
    bounded by `timeout`."""

    def __init__(self, port: int, timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.data = b""  # received and not yet consumed

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing more within {self.timeout}s; got {self.data[-300:]!r}")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"nothing more in time; got {self.data[-300:]!r}") from None
        self.data += chunk
        return bool(chunk)

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Everything up to and including `marker`, consumed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while marker not in self.data:
            if not self._more(deadline):
                raise EOFError(f"closed before {marker!r}; got {self.data[-300:]!r}")
        head, _, self.data = self.data.partition(marker)
        return head + marker

    def answer(self, head_only: bool = False, timeout: float | None = None) -> Answer:
        """The next complete answer; `head_only` for the answer to a HEAD request. Of an
        event stream, whose body never ends, only the head is read."""
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self.read_until(b"\r\n\r\n", timeout)
        answer = parse_answer(head)
        if head_only or answer.is_stream:
            return answer
        if "content-length" in answer.headers:
            length = int(answer.headers["content-length"])
            while len(self.data) < length:
                if not self._more(deadline):
                    break
            answer.body, self.data = self.data[:length], self.data[length:]
        elif answer.headers.get("transfer-encoding", "").lower() == "chunked":
            raw = self.read_until(b"0\r\n\r\n", timeout)
            answer.body = parse_answer(head + raw).body
        return answer

    def answered_within(self, seconds: float) -> bool:
        """True once anything arrives (or the connection ends) within `seconds`."""
        if self.data:
            return True
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return bool(readable)

    def closed_within(self, timeout: float) -> float:
        """Seconds until the server closes the connection (FIN or RST); reads and drops
        whatever arrives meanwhile. TimeoutError if it stays open."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            while self._more(deadline):
                self.data = self.data[-4096:]
        except ConnectionError:
            pass
        return time.monotonic() - started

    def close(self, reset: bool = False) -> None:
        """FIN, or with `reset` an RST (SO_LINGER 0), as a crashed client or a NAT would."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def admin_stats(port: int, admin_token: str) -> dict[str, Any]:
    """`data` of the stats answer, with the admin token."""
    with RawClient(port) as client:
        client.send(
            b"GET /api/sse/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + admin_token.encode()
            + b"\r\n\r\n"
        )
        answer = client.answer()
    assert answer.status == 200, answer.body
    data: dict[str, Any] = answer.json["data"]
    return data
