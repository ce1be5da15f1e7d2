"""Nothing lost across reconnects: Last-Event-ID replay, its limit, and its races."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import pytest

from tests.support.database import Database
from tests.support.pgproxy import PostgresProxy
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, SSEEvent, subscribe
from tests.support.writers import concurrent_writer

pytestmark = pytest.mark.captures  # every test once per capture mode (tests/conftest.py)


def message_ids(events: list[SSEEvent]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None and e.type == "message"]


async def read_ids(client: SSEClient, count: int, timeout: float = 10.0) -> list[int]:
    got: list[int] = []
    while len(got) < count:
        got.append(int((await client.message(timeout)).id or 0))
    return got


async def test_resume_replays_exactly_the_missed_rows_then_live(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    first = [database.insert(session_id, f"a{n}") for n in range(5)]
    assert await read_ids(client, 5) == first
    await client.close()

    missed = [database.insert(session_id, f"b{n}") for n in range(7)]
    database.insert(session_id + "-other", "not mine")
    resumed = await subscribe(broker, sessionId=session_id)  # no id: live only
    await resumed.close()
    resumed = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(first[-1])}
    )
    assert resumed.status == 200
    live = database.insert(session_id, "c")
    events = await resumed.events_until(lambda e: e.id == str(live))
    assert message_ids(events) == [*missed, live]
    await resumed.close()


async def test_resume_by_query_parameter_and_from_a_restarted_broker(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    """A broker that never saw the resume id (fresh journal) replays from the table."""
    before = [database.insert(session_id, f"x{n}") for n in range(3)]
    broker = start_broker()
    client = await SSEClient.open(
        broker.port, params={"sessionId": session_id, "lastEventId": str(before[0])}
    )
    assert await read_ids(client, 2) == before[1:]
    await client.close()


@pytest.mark.parametrize("value", ["abc", "-1", "99999999999999999999", "", "1e3", "0x10"])
async def test_bad_last_event_id_still_streams(
    broker: BrokerProcess, database: Database, session_id: str, value: str
) -> None:
    watcher = await subscribe(broker, sessionId=session_id)
    old = database.insert(session_id, "old")
    assert (await watcher.message()).id == str(old)  # routed: it cannot reach a later stream
    client = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": value}
    )
    assert client.status == 200
    live = database.insert(session_id, "new")
    events = await client.events_until(lambda e: e.id == str(live))
    assert message_ids(events) == [live]  # no replay, live works
    await client.close()


async def test_replay_limit_spreads_a_long_resume_over_reconnects(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    broker = start_broker(BROKER_REPLAY_LIMIT="40")
    start = database.insert(session_id, "start")
    with database.connect() as conn:
        rows = conn.execute(
            "INSERT INTO messages (session_id, content) SELECT %s, 'r' || n"
            " FROM generate_series(1, 130) n RETURNING id",
            (session_id,),
        ).fetchall()
    expected = sorted(int(r[0]) for r in rows)
    received: list[int] = []
    last = start
    for _ in range(4):
        client = await SSEClient.open(
            broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(last)}
        )
        events = await client.events_until(
            lambda e: e.type == "error" or (e.id is not None and int(e.id) == expected[-1])
        )
        await client.close()
        ids = message_ids(events)
        received += ids
        last = ids[-1]
        if events[-1].type == "error":
            assert "replay limit reached" in events[-1].json["error"]
            assert len(ids) == 40
        else:
            break
    assert received == expected


async def drain(broker: BrokerProcess, session: str, last: int | None, until: int) -> list[int]:
    """Resume from `last` and read up to row `until`."""
    if last is not None and last >= until:
        return []
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    client = await SSEClient.open(broker.port, params={"sessionId": session}, headers=headers)
    events = await client.events_until(lambda e: e.id is not None and int(e.id) >= until)
    await client.close()
    return message_ids(events)


async def test_resume_race_with_a_busy_writer_loses_and_repeats_nothing(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    sessions = [f"{session_id}-{n}" for n in range(5)]
    inserted: dict[str, list[int]] = {s: [] for s in sessions}
    first = {s: database.insert(s, "first") for s in sessions}
    for s in sessions:
        inserted[s].append(first[s])
    stop_writer, stop_clients = threading.Event(), asyncio.Event()
    writer = threading.Thread(
        target=concurrent_writer, args=(database, sessions, stop_writer, inserted, 400.0)
    )
    writer.start()
    rng = random.Random(7)
    # 50 clients, 10 per session; each starts from its session's first row.
    tasks = []
    for n in range(50):
        session = sessions[n % 5]
        tasks.append(
            asyncio.ensure_future(
                resuming_client_from(
                    broker, session, first[session] - 1, stop_clients, random.Random(rng.random())
                )
            )
        )
    await asyncio.sleep(5)  # the duration of the race itself, not a synchronisation
    stop_clients.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    stop_writer.set()
    writer.join(10)
    total = sum(len(v) for v in inserted.values())
    assert total > 1000, f"writer too slow: {total} rows"
    for n, (received, last) in enumerate(results):
        session = sessions[n % 5]
        expected = inserted[session]
        received += await drain(broker, session, last, expected[-1])
        dups = sorted({i for i in received if received.count(i) > 1})
        assert not dups, f"client {n} got duplicates {dups[:10]} of {len(received)}"
        assert received == expected, f"client {n} lost or reordered rows"


async def resuming_client_from(
    broker: BrokerProcess, session: str, start: int, stop: asyncio.Event, rng: random.Random
) -> tuple[list[int], int]:
    received: list[int] = []
    last = start
    while not stop.is_set():
        client = await SSEClient.open(
            broker.port, params={"sessionId": session}, headers={"Last-Event-ID": str(last)}
        )
        assert client.status == 200
        for _ in range(rng.randint(1, 40)):
            event = await client.message(timeout=10)
            received.append(int(event.id or 0))
            last = received[-1]
        await client.close()
    return received, last


# A resume on a broker whose listener is down, or has not yet LISTENed.


async def read_until(client: SSEClient, last: int) -> list[int]:
    return message_ids(await client.events_until(lambda e: e.id == str(last)))


async def test_resume_from_an_id_the_journal_lacks_gets_no_row_twice_from_the_backfill(
    start_broker: Callable[..., BrokerProcess],
    pgproxy: PostgresProxy,
    database: Database,
    session_id: str,
) -> None:
    """The soak's duplicates: a client moves to a broker whose listener is down, resuming
    from an id that broker never delivered; the replay reads the table by id, then the
    listener comes back and its backfill routes every row the journal lacks, the client's
    own rows up to its resume id among them. None of those may reach it again."""
    broker = start_broker(DATABASE_URL=pgproxy.url)
    pgproxy.listener_blocked.set()
    # the listener's connection, and in wal mode the slot's stream
    assert await asyncio.to_thread(database.terminate_listeners) == (
        2 if database.capture == "wal" else 1
    )
    await asyncio.to_thread(broker.wait_until, lambda: not broker.ready(), 10, "listener down")
    rows = [database.insert(session_id, f"during {n}") for n in range(6)]
    resumed = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(rows[2])}
    )
    replayed = await resumed.events_until(lambda e: e.id == str(rows[-1]))
    assert message_ids(replayed) == rows[3:]  # by id from the table, through the pool
    pgproxy.listener_blocked.clear()
    await asyncio.to_thread(broker.wait_until, broker.ready, 10, "listener back")
    if database.capture == "notify":  # wal: the slot kept them; no backfill
        assert broker.stats()["listener"]["backfilled"] >= len(rows)
    after = database.insert(session_id, "after")
    assert await read_until(resumed, after) == [after]


async def test_resume_before_the_first_listen_loses_no_row_committed_meanwhile(
    start_broker: Callable[..., BrokerProcess],
    pgproxy: PostgresProxy,
    database: Database,
    session_id: str,
) -> None:
    """The start-up window: a broker serves before its listener's first LISTEN. A stream
    that read the table then would miss a row committed between that read and the LISTEN
    (neither read nor notified, and below the first LISTEN's floor, so never backfilled).
    Streams therefore read nothing, and send nothing, before the first LISTEN."""
    pgproxy.listener_blocked.set()
    broker = start_broker(wait_ready=False, DATABASE_URL=pgproxy.url)
    await asyncio.to_thread(
        broker.wait_until, lambda: pgproxy.refused > 0, 20, "the listener's first attempt"
    )
    resume_from = database.insert(session_id, "the client's last")
    before = database.insert(session_id, "missed while away")
    client = await SSEClient.open(
        broker.port,
        params={"sessionId": session_id},
        headers={"Last-Event-ID": str(resume_from)},
    )
    assert client.status == 200
    with pytest.raises(TimeoutError):  # nothing, not even `connected`, before the LISTEN
        await client.event(timeout=0.5)
    meanwhile = database.insert(session_id, "committed before the first LISTEN")
    pgproxy.listener_blocked.clear()
    await asyncio.to_thread(broker.wait_until, broker.ready, 10, "first LISTEN")
    after = database.insert(session_id, "after")
    events = await client.events_until(lambda e: e.id == str(after))
    assert events[0].type == "connected" and events[0].retry == 3000  # one block
    assert message_ids(events) == [before, meanwhile, after]
