"""What the broker reads on a stream's behalf, from NOTIFY and from
Redis, is checked against the database, never taken on trust.

Each test drives the attack over real processes (a broker, PostgreSQL, redis-server) and
counts what leaked; each failed on the code before the fix (noted per test).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
import redis as redis_client

from broker.database import migrate
from broker.signing import RowKey
from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer, bus_role, on_bus, the_relay
from tests.support.sse import SSEClient, SSEEvent

INTRUDER = "pgsse_intruder"
LAST_POSSIBLE_ID = "18446744073709551615-18446744073709551615"


async def opened(port: int, session: str, **headers: str) -> SSEClient:
    client = await SSEClient.open(port, params={"sessionId": session}, headers=headers)
    assert client.status == 200
    await client.events_until(lambda event: event.type == "connected")
    return client


async def messages_until(client: SSEClient, last: int, timeout: float = 10) -> list[SSEEvent]:
    """The `message` events up to and including row `last`."""
    got = await client.events_until(lambda e: e.id == str(last), timeout)
    return [event for event in got if event.type == "message"]


def ids(events: list[SSEEvent]) -> list[int]:
    return [int(event.json["data"]["id"]) for event in events]


def next_id(database: Database) -> int:
    """The id the next INSERT draws (read without drawing it)."""
    rows = database.query("SELECT last_value + 1 FROM messages_id_seq")
    return int(rows[0][0])


def row_key(database: Database) -> RowKey:
    """The database's key, read as the superuser (what an attacker must not have)."""
    return RowKey(bytes(database.query("SELECT key FROM pgsse_key")[0][0]))


def payload(message_id: int, session: str, content: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": str(message_id),
        "sessionId": session,
        "robotId": None,
        "content": content,
        "isFromBot": False,
        "isHuman": True,
        "intent": None,
        "createdAt": "2026-01-01T00:00:00.000Z",
        **fields,
    }


@pytest.fixture
def intruder(database: Database) -> Iterator[psycopg.Connection[Any]]:
    """A role that may connect and nothing else: no privilege on `messages`."""
    run(database, f"DROP ROLE IF EXISTS {INTRUDER}")
    run(database, f"CREATE ROLE {INTRUDER} LOGIN")
    url = database.url.replace("postgres@", f"{INTRUDER}@", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn
    run(database, f"DROP ROLE IF EXISTS {INTRUDER}")


def run(database: Database, statement: str) -> None:
    """A statement with no result and no parameter (DDL: role and database names are ours)."""
    with database.connect() as conn:
        conn.execute(statement.encode())


# Rows read on a stream's behalf are filtered as stored -------------------------------------


async def test_resume_from_the_journal_never_sends_a_row_moved_to_another_session(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    """Row 2 of A is moved to B (`UPDATE`) after the journal recorded it as A's: A's resume
    from row 1 must not send it. Before the fix: row 2 with B's private content."""
    other = f"{session_id}-b"
    first = database.insert(session_id, "first")
    moved = database.insert(session_id, "mine for now")
    live = await opened(broker.port, session_id)
    last = database.insert(session_id, "last")  # so the journal surely holds the rows
    assert ids(await messages_until(live, last)) == [last]
    await live.close()
    database.query(
        "UPDATE messages SET session_id = %s, content = 'private' WHERE id = %s RETURNING id",
        (other, moved),
    )
    resumed = await opened(broker.port, session_id, **{"Last-Event-ID": str(first)})
    got = await messages_until(resumed, last)
    await resumed.close()
    leaked = [e for e in got if e.json["data"]["sessionId"] != session_id]
    print(f"\nrows of another session in the resume: {len(leaked)}")
    assert leaked == [] and ids(got) == [last]


# Notifications are signed ------------------------------------------------------------------


async def test_a_role_without_privileges_cannot_forge_a_row_with_notify(
    broker: BrokerProcess,
    database: Database,
    intruder: psycopg.Connection[Any],
    session_id: str,
) -> None:
    """The intruder NOTIFYs a row claiming the next id for A, with no signature, with a
    made-up one, and with a `sessionId` that is a list; then B's real row takes that id.
    Before the fix: A showed FORGED, B never got its row, A's resume got B's row, and the
    list crashed the listener (reconnect + backfill per NOTIFY)."""
    victim = f"{session_id}-b"
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        intruder.execute("SELECT key FROM pgsse_key")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        intruder.execute("SELECT content FROM messages LIMIT 1")
    mine = await opened(broker.port, session_id)
    theirs = await opened(broker.port, victim)
    anchor = database.insert(session_id, "anchor")
    assert ids(await messages_until(mine, anchor)) == [anchor]
    claimed = next_id(database)
    forged = orjson.dumps(payload(claimed, session_id, "FORGED")).decode()
    for text in (
        forged,
        "0" * 64 + forged,
        forged.replace(f'"{session_id}"', f'["{session_id}"]'),
        "0" * 64 + forged.replace(f'"{session_id}"', "[1]"),
    ):
        intruder.execute("SELECT pg_notify('pgsse_messages', %s)", (text,))
    real = database.insert(victim, "B's own row")
    assert real == claimed
    end = database.insert(session_id, "end")
    got_mine = await messages_until(mine, end)
    got_theirs = await messages_until(theirs, real)
    resumed = await opened(broker.port, session_id, **{"Last-Event-ID": str(anchor)})
    got_resumed = await messages_until(resumed, end)
    for client in (mine, theirs, resumed):
        await client.close()
    forged_seen = [e for e in got_mine + got_resumed if e.json["data"]["content"] == "FORGED"]
    leaked = [e for e in got_resumed if e.json["data"]["sessionId"] != session_id]
    print(f"\nforged rows delivered: {len(forged_seen)}; rows leaked by resume: {len(leaked)}")
    assert forged_seen == [] and leaked == []
    assert ids(got_mine) == [end] and ids(got_resumed) == [end]
    assert ids(got_theirs) == [real]  # B's row reached B
    stats = broker.stats()
    assert stats["listener"]["reconnects"] == 0 and stats["listener"]["connected"]  # no crash
    assert stats["counters"]["refused"] == 4
    refused = [e for e in broker.log_events() if e["event"] == "notification_refused"]
    assert 1 <= len(refused) <= 2  # at most a line a second, with the count
    assert all("FORGED" not in json.dumps(event) for event in broker.log_events())


@pytest.mark.parametrize("feed", ["listener", "bus"])
async def test_ids_reused_after_a_restart_identity_reach_their_own_session_only(
    feed: str,
    start_broker: Callable[..., BrokerProcess],
    request: pytest.FixtureRequest,
    database: Database,
    session_id: str,
) -> None:
    """Rows of A take ids N..N+2 and are delivered; then they are deleted and the identity
    restarted at N (what `TRUNCATE ... RESTART IDENTITY` or a restore does to the ids), and
    B's rows take N..N+2; on the bus, the Redis stream keeps A's entries. Before the fix: B's
    live stream never got them ("already in the journal") and A's resume from N-1 did."""
    if feed == "bus":
        redis: RedisServer = request.getfixturevalue("redis")
        broker = on_bus(start_broker, redis, f"test:{uuid.uuid4().hex[:8]}")
        broker.wait_until(lambda: bus_role(broker) == "relay", 20, "the relay")
    else:
        broker = start_broker()
    victim = f"{session_id}-b"
    mine = await opened(broker.port, session_id)
    theirs = await opened(broker.port, victim)
    anchor = database.insert(session_id, "anchor")
    assert ids(await messages_until(mine, anchor)) == [anchor]
    with database.connect() as conn, conn.transaction():
        conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # no other test's row between
        first = [database_insert(conn, session_id, f"A{i}") for i in range(3)]
    assert ids(await messages_until(mine, first[-1])) == first
    with database.connect() as conn, conn.transaction():
        conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
        top = conn.execute("SELECT max(id) FROM messages").fetchone()
        assert top == (first[-1],), "rows of another test after ours: cannot restart here"
        conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (first,))
        conn.execute(
            psycopg.sql.SQL("ALTER TABLE messages ALTER COLUMN id RESTART WITH {}").format(
                psycopg.sql.Literal(first[0])
            )
        )
        reused = [database_insert(conn, victim, f"B{i}") for i in range(3)]
    assert reused == first
    got_theirs = await messages_until(theirs, reused[-1])
    end = database.insert(session_id, "end")
    assert ids(await messages_until(mine, end)) == [end]
    resumed = await opened(broker.port, session_id, **{"Last-Event-ID": str(anchor)})
    got_resumed = await messages_until(resumed, end)
    for client in (mine, theirs, resumed):
        await client.close()
    leaked = [e for e in got_resumed if e.json["data"]["sessionId"] != session_id]
    print(f"\nreused rows delivered to B: {len(got_theirs)}/3; leaked to A's resume: {len(leaked)}")
    assert ids(got_theirs) == reused and leaked == [] and ids(got_resumed) == [end]
    assert any(e["event"] == "row_ids_reused" for e in broker.log_events())
    assert broker.stats()["counters"]["idsReused"] == 1


def database_insert(conn: psycopg.Connection[Any], session: str, content: str) -> int:
    row = conn.execute(
        "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
        (session, content),
    ).fetchone()
    assert row is not None
    return int(row[0])


# Bus entries are signed and name their database ---------------------------------------------


def log_count(broker: BrokerProcess, event: str) -> int:
    return sum(1 for e in broker.log_events() if e["event"] == event)


async def test_forged_and_malformed_bus_entries_are_refused_and_passed(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """XADDs of a forged row claiming the next id, a signed row (the key stolen, here read as
    the superuser) with non-string `content`/`robotId`, and a malformed entry left at the
    tail. Before the fix: the forged row reached A, B lost its row, and the malformed tail
    put the reader in a hot loop (thousands of log lines a second)."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    broker = on_bus(start_broker, redis, stream)
    broker.wait_until(lambda: bus_role(broker) == "relay", 20, "the relay")
    victim = f"{session_id}-b"
    mine = await opened(broker.port, session_id)
    theirs = await opened(broker.port, victim)
    key = row_key(database)
    claimed = next_id(database)
    attacker = redis_client.Redis.from_url(redis.url)
    forged = orjson.dumps(payload(claimed, session_id, "FORGED"))
    attacker.xadd(stream, {"row": forged})
    attacker.xadd(stream, {"row": b"0" * 64 + forged, "db": key.database})
    for bad in ({"content": ["FORGED"]}, {"robotId": {"x": 1}}, {"sessionId": 7}):
        signed = key.sign(orjson.dumps({**payload(claimed, session_id, "FORGED"), **bad}))
        attacker.xadd(stream, {"row": signed, "db": key.database})
    attacker.xadd(stream, {"row": b"not json", "db": key.database})  # the tail, for now
    await asyncio.sleep(3)  # what a hot loop would log in this time is the measure
    refusals = log_count(broker, "bus_entry_refused")
    real = database.insert(victim, "B's own row")
    assert real == claimed
    end = database.insert(session_id, "end")
    got_mine = await messages_until(mine, end)
    got_theirs = await messages_until(theirs, real)
    for client in (mine, theirs):
        await client.close()
    attacker.close()
    print(
        f"\nforged rows delivered: {ids(got_mine).count(claimed)}; refusal lines in 3 s: {refusals}"
    )
    assert ids(got_mine) == [end] and ids(got_theirs) == [real]
    assert 1 <= refusals <= 5  # logged at most once a second, not once per read
    assert all("FORGED" not in json.dumps(event) for event in broker.log_events())
    assert broker.stats()["counters"]["refused"] == 6


async def test_an_entry_with_the_largest_stream_id_is_recovered_from(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """XADD with id 18446744073709551615-18446744073709551615: every XADD * fails after it.
    Before the fix nothing was delivered again on any broker, even after DEL of the stream."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    the_relay(brokers)
    clients = [await opened(b.port, session_id) for b in brokers]
    before = database.insert(session_id, "before")
    for client in clients:
        assert ids(await messages_until(client, before)) == [before]
    attacker = redis_client.Redis.from_url(redis.url)
    attacker.xadd(stream, {"row": b"x"}, id=LAST_POSSIBLE_ID)
    attacker.close()
    started = time.monotonic()
    rows = [database.insert(session_id, f"after {i}") for i in range(3)]
    for client in clients:
        got = await messages_until(client, rows[-1], timeout=20)
        assert ids(got) == rows  # every row, once, in order
        await client.close()
    print(f"\ndelivery back after {time.monotonic() - started:.1f} s")
    assert sum(log_count(b, "bus_stream_exhausted") for b in brokers) >= 1
    for broker in brokers:
        broker.wait_until(lambda b=broker: b.get("/readyz")[0] == 200, 10, "ready again")


async def test_two_databases_sharing_a_stream_do_not_deliver_each_others_rows(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """Two deployments on two databases, one Redis, the same BROKER_BUS_STREAM, the same
    session id. Before the fix each delivered the other's rows live."""
    other_db = f"pgsse_other_{uuid.uuid4().hex[:6]}"
    run(database, f"CREATE DATABASE {other_db}")
    other_url = database.url.replace("/postgres?", f"/{other_db}?", 1)
    migrate(other_url)
    stream = f"test:{uuid.uuid4().hex[:8]}"
    ours = on_bus(start_broker, redis, stream)
    theirs = on_bus(start_broker, redis, stream, DATABASE_URL=other_url)
    for broker in (ours, theirs):
        broker.wait_until(lambda b=broker: bus_role(b) == "relay", 20, "relays")
    our_client = await opened(ours.port, session_id)
    their_client = await opened(theirs.port, session_id)
    with psycopg.connect(other_url, autocommit=True) as conn:
        foreign = database_insert(conn, session_id, "the other deployment's")
    ours_row = database.insert(session_id, "ours")
    got_theirs = await messages_until(their_client, foreign)
    got_ours = await messages_until(our_client, ours_row)
    for client in (our_client, their_client):
        await client.close()
    crossed = [e for e in got_ours if e.json["data"]["content"] != "ours"]
    print(f"\nrows of the other deployment delivered: {len(crossed)}")
    assert crossed == [] and ids(got_ours) == [ours_row]
    assert [e.json["data"]["content"] for e in got_theirs] == ["the other deployment's"]
    for broker in (ours, theirs):
        broker.stop()
    run(database, f"DROP DATABASE {other_db} WITH (FORCE)")
