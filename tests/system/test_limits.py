"""Limits and the admin surface: per-client stream cap, request-head limits (slowloris),
CORS allowlist, and stats/metrics kept off the public port.

Clients are told apart by source address (the whole of 127.0.0.0/8 is loopback, so a test
can connect from 127.0.0.2) or by `X-Forwarded-For` from a trusted proxy (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from broker.config.settings import Settings
from broker.errors import ConfigError
from broker.server.protocol import server_options
from broker.web.limits import StreamCounter
from tests.support.database import Database
from tests.support.processes import BrokerProcess, free_port
from tests.support.security import (
    Answer,
    mint,
    new_secret,
    no_secret_in_logs,  # noqa: F401 -- autouse: no token or secret in any broker log
    open_stream,
    refused,
    request,
)
from tests.support.sse import SSEClient, connected

StartBroker = Callable[..., BrokerProcess]
TRUSTED = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")]


# Pure


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        ("127.0.0.1", ["203.0.113.7"], [], "127.0.0.1"),  # no trusted proxy: header ignored
        ("192.0.2.9", ["203.0.113.7"], TRUSTED, "192.0.2.9"),  # untrusted peer: ignored
        ("127.0.0.1", ["203.0.113.7"], TRUSTED, "203.0.113.7"),
        ("127.0.0.1", [], TRUSTED, "127.0.0.1"),
        # The client wrote the leftmost entries: only the rightmost untrusted one counts.
        ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], TRUSTED, "203.0.113.7"),
        ("127.0.0.1", ["198.51.100.1", "203.0.113.7, 10.1.2.3"], TRUSTED, "203.0.113.7"),
        ("127.0.0.1", ["10.0.0.2, 10.1.2.3"], TRUSTED, "10.0.0.2"),  # all trusted: leftmost
        ("127.0.0.1", ["[2001:db8::1]:443"], TRUSTED, "2001:db8::1"),
        ("::ffff:127.0.0.1", ["203.0.113.7"], TRUSTED, "203.0.113.7"),
        ("127.0.0.1", ["not-an-ip"], TRUSTED, "not-an-ip"),
        ("127.0.0.1", [" , ,"], TRUSTED, "127.0.0.1"),
        (None, ["203.0.113.7"], TRUSTED, "unknown"),
    ],
)
async def test_client_address_believes_only_trusted_proxies(
    peer: str | None,
    forwarded: list[str],
    trusted: list[ipaddress.IPv4Network],
    client: str,
) -> None:
    """uvicorn's proxy-header handling, configured as the broker configures it, decides the
    client address the per-client cap counts (`Guard`: "unknown" without one)."""
    options = server_options(Settings(trusted_proxies=tuple(trusted)))
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["client"])

    wrapped: ASGIApp = app
    if options["proxy_headers"]:
        wrapped = ProxyHeadersMiddleware(app, trusted_hosts=options["forwarded_allow_ips"])
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    scope = {"type": "http", "client": None if peer is None else (peer, 5000), "headers": headers}
    await wrapped(scope, _never, _never)
    assert (seen[0][0] if seen[0] else "unknown") == client


async def _never(*args: Any) -> Any:
    raise AssertionError("not called")


def test_stream_counter_caps_each_client_and_releases() -> None:
    counter = StreamCounter(2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    for _ in range(3):
        counter.release("a")
    counter.release("b")
    assert len(counter) == 0 and counter.clients() == 0


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("BROKER_MAX_STREAMS_PER_IP", "0"),
        ("BROKER_MAX_STREAMS_PER_IP", "many"),
        ("BROKER_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("BROKER_TRUSTED_PROXIES", "nginx"),
        ("BROKER_HEADER_TIMEOUT_SECONDS", "0"),
        ("BROKER_HEADER_TIMEOUT_SECONDS", "inf"),
        ("BROKER_MAX_HEADER_BYTES", "100"),
        ("BROKER_ADMIN_PORT", "0"),
        ("BROKER_ADMIN_PORT", "70000"),
        ("BROKER_CORS_ORIGINS", "https://app.example.com/"),
        ("BROKER_CORS_ORIGINS", "https://app.example.com/path"),
        ("BROKER_CORS_ORIGINS", "app.example.com"),
        ("BROKER_CORS_ORIGINS", "https://user@app.example.com"),
    ],
)
def test_limit_settings_are_checked_naming_the_setting(env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^invalid {env}="):
        Settings.load({env: value})


def test_limit_settings_parse() -> None:
    settings = Settings.load(
        {
            "BROKER_MAX_STREAMS_PER_IP": "7",
            "BROKER_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8,::1",
            "BROKER_HEADER_TIMEOUT_SECONDS": "2.5",
            "BROKER_MAX_HEADER_BYTES": "4096",
            "BROKER_ADMIN_PORT": "9100",
            "BROKER_CORS_ORIGINS": "https://app.example.com,http://localhost:3000",
        }
    )
    assert settings.max_streams_per_ip == 7
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert (settings.header_timeout_seconds, settings.max_header_bytes) == (2.5, 4096)
    assert settings.admin_port == 9100
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:3000")
    with pytest.raises(ConfigError, match="BROKER_ADMIN_PORT=5001: must differ"):
        Settings.load({"BROKER_ADMIN_PORT": "5001"})


# The admin surface


HIDDEN_TARGETS = [
    "/api/sse/stats",
    "/metrics",
    "/api/sse/stats%0A",  # a regex `$` matches before a trailing newline: must not slip by
    "/metrics%0a",
    "/api/sse/%73tats",
]


def _is_stats_or_metrics(answer: Answer) -> bool:
    return b"totalConnections" in answer.body or b"# TYPE" in answer.body


async def test_admin_port_serves_stats_and_metrics_and_the_public_port_hides_them(
    start_broker: StartBroker, session_id: str
) -> None:
    admin = free_port()
    broker = start_broker(BROKER_ADMIN_PORT=str(admin))
    for target in HIDDEN_TARGETS:
        for method in ("GET", "HEAD"):
            answer = await request(broker.port, method, target)
            hidden = 400 if "%0" in target else 404  # a control character: refused first
            assert (target, method, answer.status) == (target, method, hidden)
            assert not _is_stats_or_metrics(answer)
    slash = await request(broker.port, "GET", "/api/sse/stats/")
    assert slash.status != 200 and not _is_stats_or_metrics(slash)

    stream = await connected(await open_stream(broker.port, {"sessionId": session_id}))
    stats = await request(admin, "GET", "/api/sse/stats")
    assert stats.status == 200
    assert stats.json["data"]["channels"] == {f"session_messages:{session_id}": 1}
    metrics = await request(admin, "GET", "/metrics")
    assert metrics.status == 200 and b"# TYPE" in metrics.body
    # The admin port serves the admin surface and the probes, nothing else.
    assert (await request(admin, "GET", "/healthz")).status == 200
    assert (await request(admin, "GET", "/readyz")).status == 200
    for target in ("/api/sse/messages", "/", "/api/messages"):
        assert (await request(admin, "GET", target)).status == 404
    await stream.close()


async def test_admin_token_guards_admin_paths_on_the_public_port(
    start_broker: StartBroker,
) -> None:
    admin_token = "adm-" + new_secret()
    broker = start_broker(BROKER_ADMIN_TOKEN=admin_token)
    for target in ("/api/sse/stats", "/metrics"):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": f"Basic {admin_token}"},
            {"Authorization": f"Bearer {admin_token}x"},
        ):
            answer = await request(broker.port, "GET", target, headers)
            assert answer.status == 401, (target, headers.keys())
            assert answer.json["success"] is False and not _is_stats_or_metrics(answer)
        good = await request(broker.port, "GET", target, {"Authorization": f"Bearer {admin_token}"})
        assert good.status == 200 and _is_stats_or_metrics(good), target
    # A control character in the path is refused before any route, token or not.
    bearer = {"Authorization": f"Bearer {admin_token}"}
    newline = await request(broker.port, "GET", "/api/sse/stats%0A", bearer)
    assert newline.status == 400 and not _is_stats_or_metrics(newline)


async def test_admin_port_with_a_token_needs_the_token_too(start_broker: StartBroker) -> None:
    admin, admin_token = free_port(), "adm-" + new_secret()
    broker = start_broker(BROKER_ADMIN_PORT=str(admin), BROKER_ADMIN_TOKEN=admin_token)
    assert (await request(admin, "GET", "/api/sse/stats")).status == 401
    ok = await request(admin, "GET", "/api/sse/stats", {"Authorization": f"Bearer {admin_token}"})
    assert ok.status == 200
    # The public port never serves them, token or not.
    public = await request(
        broker.port, "GET", "/api/sse/stats", {"Authorization": f"Bearer {admin_token}"}
    )
    assert public.status == 404


async def test_with_auth_and_no_admin_setting_the_admin_paths_are_hidden(
    start_broker: StartBroker,
) -> None:
    secret = new_secret()
    broker = start_broker(BROKER_AUTH_SECRET=secret)
    star = mint(secret, "*", publish=True)
    for target in ("/api/sse/stats", "/metrics"):
        answer = await request(broker.port, "GET", target, {"Authorization": f"Bearer {star}"})
        assert answer.status == 404 and not _is_stats_or_metrics(answer)
    broker.stop()
    exposure = [e for e in broker.log_events() if e["event"] in ("auth_disabled", "admin_hidden")]
    assert [(e["event"], e["level"]) for e in exposure] == [("admin_hidden", "warning")]


async def test_an_admin_port_already_taken_stops_start_up_naming_the_setting(
    start_broker: StartBroker,
) -> None:
    first = start_broker()
    broker = start_broker(wait_ready=False, BROKER_ADMIN_PORT=str(first.port))
    assert broker.wait(timeout=20) != 0
    assert "BROKER_ADMIN_PORT" in broker.log()


# Per-client stream cap


async def _stats(admin: int) -> dict[str, int]:
    answer = await request(admin, "GET", "/api/sse/stats")
    assert answer.status == 200
    data: dict[str, int] = answer.json["data"]
    return data


async def test_per_client_cap_counts_forwarded_clients_from_a_trusted_proxy(
    start_broker: StartBroker, session_id: str
) -> None:
    admin = free_port()
    broker = start_broker(
        BROKER_MAX_STREAMS_PER_IP="3",
        BROKER_TRUSTED_PROXIES="127.0.0.1",
        BROKER_ADMIN_PORT=str(admin),
    )
    params = {"sessionId": session_id}

    def via_proxy(client: str) -> dict[str, str]:
        return {"X-Forwarded-For": client}

    alice = [
        await connected(await open_stream(broker.port, params, via_proxy("203.0.113.7")))
        for _ in range(3)
    ]
    over = await SSEClient.open(broker.port, params=params, headers=via_proxy("203.0.113.7"))
    status, headers, body = await refused(over)
    assert status == 429 and int(headers["retry-after"]) > 0
    assert body["success"] is False and "at most 3" in body["error"]
    # A client cannot escape its bucket by prepending addresses: nginx appends the real one.
    spoofed = await SSEClient.open(
        broker.port, params=params, headers=via_proxy("198.51.100.1, 203.0.113.7")
    )
    assert (await refused(spoofed))[0] == 429
    bob = await connected(await open_stream(broker.port, params, via_proxy("203.0.113.8")))
    assert (await _stats(admin))["totalConnections"] == 4

    # A closed stream frees its slot.
    await alice.pop().close()
    deadline = time.monotonic() + 5
    while True:
        again = await SSEClient.open(broker.port, params=params, headers=via_proxy("203.0.113.7"))
        if again.status == 200:
            alice.append(await connected(again))
            break
        await refused(again)
        assert time.monotonic() < deadline, "the closed stream's slot was never released"
        await asyncio.sleep(0.05)
    for client in [*alice, bob]:
        await client.close()


async def test_per_client_cap_counts_source_addresses_and_ignores_untrusted_headers(
    start_broker: StartBroker, session_id: str
) -> None:
    broker = start_broker(BROKER_MAX_STREAMS_PER_IP="2")
    params = {"sessionId": session_id}
    first = [
        await connected(await open_stream(broker.port, params, local_host="127.0.0.2"))
        for _ in range(2)
    ]
    over = await open_stream(broker.port, params, local_host="127.0.0.2")
    assert (await refused(over))[0] == 429
    # No trusted proxy is configured: X-Forwarded-For changes nothing.
    forged = await open_stream(
        broker.port, params, {"X-Forwarded-For": "198.51.100.1"}, local_host="127.0.0.2"
    )
    assert (await refused(forged))[0] == 429
    other = await connected(await open_stream(broker.port, params, local_host="127.0.0.3"))
    for client in [*first, other]:
        await client.close()


# Request heads: size and time


async def test_oversized_request_heads_get_431(start_broker: StartBroker) -> None:
    broker = start_broker(BROKER_MAX_HEADER_BYTES="4096")
    big = await request(broker.port, "GET", "/healthz", {"X-Filler": "x" * 5000})
    assert big.status == 431 and big.json == {
        "success": False,
        "error": "request headers too large",
    }
    long_target = await request(broker.port, "GET", "/healthz?" + "q" * 5000)
    assert long_target.status == 431
    assert (await request(broker.port, "GET", "/healthz", {"X-Filler": "x" * 3000})).status == 200

    # An endless header is cut off while it is still arriving, not buffered for ever: the
    # broker answers 431 and closes, after which the client cannot send any more. What the
    # client sends before that is not the broker's doing but the kernel's: its send buffer
    # and the broker's receive buffer take bytes nobody has read, the more the later the
    # broker is scheduled. A fixed cap of 1 MB failed on a loaded machine (1,000,448 bytes
    # went into those buffers); the cap is now what the buffers can hold at most, so sending
    # more proves the broker itself read it.
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # fixed: no autotuning
    cap = unread_bytes_bound(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    sent = 0
    chunk = b"y" * 65536
    with contextlib.suppress(ConnectionError):
        while sent <= cap:
            writer.write(chunk)
            # A broker that neither reads nor closes would block this for ever.
            await asyncio.wait_for(writer.drain(), 30)
            sent += len(chunk)
    answer = b""
    with contextlib.suppress(ConnectionError):  # a reset may overtake the 431 on the wire
        answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b""
    assert sent <= cap, f"the broker kept reading an endless header ({sent} bytes)"


def unread_bytes_bound(send_buffer: int) -> int:
    """The most a TCP connection over loopback can take from a sender whose peer reads
    nothing: the sender's send buffer (set, so fixed), the largest receive buffer the kernel
    grows to, and
    1 MiB of the broker's own reads (uvicorn reads 64 KiB at a time) before it sees the
    limit is passed."""
    receive_max = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    return send_buffer + receive_max + 2**20


async def test_slowloris_connections_do_not_block_streams_and_are_closed_on_time(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    timeout = 3.0
    broker = start_broker(BROKER_HEADER_TIMEOUT_SECONDS=str(timeout))
    opened = time.monotonic()

    async def slow() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(b"GET /api/sse/messages?sessionId=sl")  # half a request line, no more
        await writer.drain()
        return reader, writer

    slow_clients = await asyncio.gather(*(slow() for _ in range(500)))
    all_open = time.monotonic() - opened

    # A normal client streams while the 500 hang, and keeps streaming after they are gone.
    client = await connected(await open_stream(broker.port, {"sessionId": session_id}))
    row = database.insert(session_id, "through the siege")
    assert (await client.message(timeout=5)).id == str(row)
    assert time.monotonic() - opened < timeout, "the normal client was not served in time"

    async def closed_at(reader: asyncio.StreamReader) -> float:
        with contextlib.suppress(ConnectionError):
            data = await reader.read(1024)
            assert data == b"", data  # nothing is answered: the connection is just closed
        return time.monotonic() - opened

    closings = sorted(
        await asyncio.wait_for(
            asyncio.gather(*(closed_at(reader) for reader, _ in slow_clients)), timeout + 5
        )
    )
    for _, writer in slow_clients:
        writer.close()
    print(
        f"\nslowloris: 500 half requests opened in {all_open:.2f}s; closed after"
        f" {closings[0]:.2f}s (first) to {closings[-1]:.2f}s (last), timeout {timeout}s"
    )
    assert closings[0] >= timeout - 0.1, "closed before the timeout"
    assert closings[-1] <= all_open + timeout + 2.0, "not closed in time"

    # The stream, whose head was complete, outlives the timeout and still delivers.
    row = database.insert(session_id, "after the siege")
    assert (await client.message(timeout=5)).id == str(row)
    await client.close()


async def test_a_kept_alive_connection_must_finish_each_head_in_time(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(BROKER_HEADER_TIMEOUT_SECONDS="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-len")
    )
    await reader.readexactly(length)
    started = time.monotonic()
    writer.write(b"GET /heal")  # the second request stalls
    await writer.drain()
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    elapsed = time.monotonic() - started
    writer.close()
    assert 0.9 <= elapsed < 3, elapsed


# CORS


async def test_cors_allows_exactly_the_listed_origins(
    start_broker: StartBroker, session_id: str
) -> None:
    secret = new_secret()
    allowed = "https://app.example.com"
    broker = start_broker(BROKER_AUTH_SECRET=secret, BROKER_CORS_ORIGINS=allowed)
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = await request(broker.port, "OPTIONS", "/api/messages", {"Origin": allowed, **preflight})
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == allowed
    for origin in ("https://evil.example.com", "https://app.example.com.evil.com", "null"):
        bad = await request(
            broker.port, "OPTIONS", "/api/messages", {"Origin": origin, **preflight}
        )
        assert bad.status == 400 and "access-control-allow-origin" not in bad.headers, origin

    token = mint(secret, [session_id])
    params = {"sessionId": session_id, "token": token}
    stream = await open_stream(broker.port, params, {"Origin": allowed})
    assert stream.headers["access-control-allow-origin"] == allowed
    await (await connected(stream)).close()
    foreign = await open_stream(broker.port, params, {"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in foreign.headers
    await foreign.close()
    # Refusals carry CORS headers too, so a page can read why it was refused.
    denied = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Origin": allowed}
    )
    status, headers, _ = await refused(denied)
    assert status == 401 and headers["access-control-allow-origin"] == allowed
