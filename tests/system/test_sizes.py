"""What one row and one subscriber may cost, over real processes.

A 50 MiB row inserted by SQL delayed every other session's rows by 2.5 s (5.1 s on the bus)
and raised the broker's RSS by 100 MiB for good: rows over `BROKER_MAX_ROW_BYTES` are read cut
by PostgreSQL and sent cut, flagged `truncated`, live and on resume alike. A client that never
reads was cut only after 1,000 queued events, whatever their size: `BROKER_QUEUE_BYTES` bounds
its queue in bytes. A token whose `exp` is past the float range was a 500 that left its
subscription counted for good, and `exp: 1e300` was accepted: `exp` is at most a year ahead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.security import RawClient, admin_stats, new_secret, remember
from tests.support.sse import SSEClient
from tests.support.writers import rows_of

StartBroker = Callable[..., BrokerProcess]
MIB = 1024 * 1024
BIG = 50 * MIB


def _insert_big_then_small(
    database: Database, big_session: str, small_session: str
) -> tuple[int, float]:
    """A 50 MiB row in `big_session`, then, once it committed, a small one in `small_session`:
    the big row's id, and when the small one committed (`time.monotonic()`)."""
    with database.connect() as conn:
        row = conn.execute(
            "INSERT INTO messages (session_id, content) VALUES (%s, repeat('x', %s)) RETURNING id",
            (big_session, BIG),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO messages (session_id, content) VALUES (%s, 'right after')",
            (small_session,),
        )
        return int(row[0]), time.monotonic()


@pytest.mark.parametrize("transport", ["listen", "bus"])
async def test_a_50_mib_row_delays_no_other_session_and_is_sent_cut(
    request: pytest.FixtureRequest, start_broker: StartBroker, database: Database, transport: str
) -> None:
    env: dict[str, str] = {}
    if transport == "bus":
        redis = request.getfixturevalue("redis")
        env = {"BROKER_BUS_URL": redis.url, "BROKER_BUS_STREAM": f"t:{uuid.uuid4().hex[:8]}"}
    broker = start_broker(**env)
    big, small = f"big-{uuid.uuid4().hex[:8]}", f"small-{uuid.uuid4().hex[:8]}"
    big_stream = await SSEClient.open(broker.port, params={"sessionId": big})
    small_stream = await SSEClient.open(broker.port, params={"sessionId": small})
    for stream in (big_stream, small_stream):
        await stream.events_until(lambda event: event.type == "connected")
    baseline = broker.rss_kib()

    big_id, committed = await asyncio.to_thread(_insert_big_then_small, database, big, small)
    arrived = await small_stream.message(timeout=20)
    delay = time.monotonic() - committed
    cut = (await big_stream.message(timeout=20)).json["data"]
    growth = (broker.rss_kib() - baseline) / 1024
    print(f"\n{transport}: other session's row {delay * 1000:.0f} ms after its commit;")
    print(f"RSS {baseline / 1024:.0f} MiB, +{growth:.1f} MiB after a 50 MiB row")

    assert arrived.json["data"]["content"] == "right after"
    assert delay < 1.0, f"another session's row came {delay:.2f}s after its commit"
    assert cut["id"] == str(big_id) and cut["truncated"] is True
    assert cut["contentBytes"] == BIG and cut["content"] == "x" * MIB
    assert growth < 40, f"RSS grew {growth:.1f} MiB for one 50 MiB row"

    # Resume and history send the row exactly as live did.
    resumed = await SSEClient.open(
        broker.port, params={"sessionId": big}, headers={"Last-Event-ID": str(big_id - 1)}
    )
    assert (await resumed.message(timeout=20)).json["data"] == cut
    history = await SSEClient.open(broker.port, params={"sessionId": big, "history": "1"})
    assert (await history.message(timeout=20)).json["data"] == cut


def _stuck_readers(
    broker: BrokerProcess, database: Database, session_id: str
) -> tuple[float | None, int]:
    """Two clients that read nothing after the head, then 60 rows of 512 KiB (60 events, far
    below 1,000, but 30 MiB each): seconds until both were cut (None: never), peak RSS KiB."""
    stuck = []
    for _ in range(2):
        client = RawClient(broker.port, rcvbuf=4096)
        client.send(
            f"GET /api/sse/messages?sessionId={session_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert client.answer().status == 200
        stuck.append(client)
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 2, 5, "two streams")
    rows_of(database, session_id, 60, MIB // 2)
    peak, started, cut_after = 0, time.monotonic(), None
    while time.monotonic() - started < 20:
        peak = max(peak, broker.rss_kib())
        if cut_after is None and broker.stats()["totalConnections"] == 0:
            cut_after = time.monotonic() - started
        if cut_after is not None and time.monotonic() - started > cut_after + 1:
            break
        time.sleep(0.05)
    for client in stuck:
        client.close()
    return cut_after, peak


def test_clients_that_never_read_are_cut_by_bytes_and_their_memory_released(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    broker = start_broker()  # the defaults: 1,000 events, 4 MiB
    baseline = broker.rss_kib()
    cut_after, peak = _stuck_readers(broker, database, session_id)
    growth = (peak - baseline) / 1024
    assert cut_after is not None, f"never cut (RSS +{growth:.1f} MiB)"
    assert broker.stats()["counters"]["slowConsumerDisconnects"] >= 2
    # Released: a second round reuses that memory rather than adding to it.
    again, second_peak = _stuck_readers(broker, database, session_id)
    more = (second_peak - peak) / 1024
    print(f"\n2 stuck readers x 60 rows of 512 KiB: RSS {baseline / 1024:.0f} MiB, peak")
    print(f"+{growth:.1f} MiB, both cut after {cut_after:.2f}s; a second round +{more:.1f} MiB")
    assert growth < 48, f"RSS grew {growth:.1f} MiB for two stuck readers"
    assert again is not None and more < 8, f"a second round added {more:.1f} MiB"


@pytest.mark.parametrize(
    "exp",
    [10**400, 1e300, "two years"],
    ids=["past-the-float-range", "1e300", "two-years-ahead"],
)
def test_a_token_that_never_expires_is_401_and_holds_nothing(
    start_broker: StartBroker, session_id: str, exp: Any
) -> None:
    secret, admin_token = new_secret(), "adm-" + new_secret()
    broker = start_broker(BROKER_AUTH_SECRET=secret, BROKER_ADMIN_TOKEN=admin_token)
    if exp == "two years":
        exp = int(time.time()) + 2 * 366 * 24 * 3600
    token = jwt.encode({"sessions": [session_id], "exp": exp}, secret, algorithm="HS256")
    remember(token)
    with RawClient(broker.port) as client:
        client.send(
            f"GET /api/sse/messages?sessionId={session_id}&token={token} HTTP/1.1\r\n"
            "Host: x\r\n\r\n".encode()
        )
        answer = client.answer()
    assert answer.status == 401, answer
    assert answer.json == {
        "success": False,
        "error": "token claim exp must be at most a year ahead",
    }
    stats = admin_stats(broker.port, admin_token)
    assert stats["totalConnections"] == 0 and stats["channels"] == {}
