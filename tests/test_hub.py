"""Routing and bounded queues, pure: no I/O, no event loop needed except for `wait`."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from broker.changes import Change
from broker.errors import Unavailable
from broker.events import Message
from broker.filters import Filter
from broker.hub import GLOBAL_CHANNEL, Hub


def message(id_: int, session: str = "a", robot: str | None = None) -> Message:
    return Message(id_, session, robot, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


def ids(subscriber) -> list[int]:  # type: ignore[no-untyped-def]
    return [event.id for event in subscriber.take()]


def test_routes_by_session_robot_and_global() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a = hub.subscribe("a", None)
    a_r1 = hub.subscribe("a", "r1")
    everything = hub.subscribe(None, None)
    r1 = hub.subscribe(None, "r1")
    hub.publish(message(1, "a", "r1"))
    hub.publish(message(2, "b", "r1"))
    hub.publish(message(3, "a", "r2"))
    hub.publish(message(4, "b"))
    assert ids(a) == [1, 3]
    assert ids(a_r1) == [1]
    assert ids(everything) == [1, 2, 3, 4]
    assert ids(r1) == [1, 2]


def test_event_bytes_are_encoded_once_and_shared() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    first, second = hub.subscribe("a", None), hub.subscribe(None, None)
    hub.publish(message(1))
    assert first.take()[0].data is second.take()[0].data


def test_channels_and_capacity() -> None:
    hub = Hub(max_subscribers=3, queue_size=10)
    subs = [hub.subscribe("a", None), hub.subscribe("a", "r"), hub.subscribe(None, "r")]
    assert hub.channels() == {"session_messages:a": 2, GLOBAL_CHANNEL: 1}
    with pytest.raises(Unavailable):
        hub.subscribe("b", None)
    assert hub.counters.rejected_connections == 1
    hub.unsubscribe(subs[0])
    hub.unsubscribe(subs[0])
    assert len(hub) == 2 and hub.channels() == {"session_messages:a": 1, GLOBAL_CHANNEL: 1}
    for subscriber in subs:
        hub.unsubscribe(subscriber)
    assert len(hub) == 0 and hub.channels() == {}


def test_full_queue_closes_only_the_slow_subscriber() -> None:
    hub = Hub(max_subscribers=10, queue_size=3)
    slow, fast = hub.subscribe("a", None), hub.subscribe("a", None)
    closed = []
    slow.on_close = lambda: closed.append(True)
    for n in range(1, 4):
        hub.publish(message(n))
        ids(fast)
    assert not slow.closed
    hub.publish(message(4))
    assert slow.closed and slow.close_reason and "slow consumer" in slow.close_reason
    assert closed == [True] and slow.take() == []
    assert ids(fast) == [4]
    hub.publish(message(5))
    assert hub.counters.slow_consumer_disconnects == 1
    assert ids(fast) == [5]


def test_heartbeat_reaches_everyone_once_encoded() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    subs = [hub.subscribe("a", None), hub.subscribe(None, None)]
    hub.heartbeat()
    events = [s.take() for s in subs]
    assert events[0][0].data is events[1][0].data and b"heartbeat" in events[0][0].data


async def test_wait_wakes_on_push_and_on_close() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    subscriber = hub.subscribe("a", None)
    waiter = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(message(1))
    await asyncio.wait_for(waiter, 1)
    subscriber.take()
    waiter = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    subscriber.close("bye")
    await asyncio.wait_for(waiter, 1)
    assert subscriber.close_reason == "bye"


def test_mark_sent_drops_queued_copies_and_skips_later_routing_once() -> None:
    """A replay sent rows 2 and 3: 2 was already queued (routed after subscribing), 3 has
    yet to be routed (a notification in flight). Neither is queued twice, and once row 3
    has been skipped it is forgotten."""
    hub = Hub(max_subscribers=10, queue_size=10)
    subscriber = hub.subscribe("a", None)
    hub.publish(message(1))
    hub.publish(message(2))
    hub.heartbeat()
    hub.mark_sent(subscriber, [2, 3])
    assert [e.id for e in subscriber.take()] == [1, 0]  # the heartbeat stays
    assert subscriber.seen is not None and subscriber.seen.to_skip == {3}
    hub.publish(message(3))
    hub.publish(message(4))
    assert ids(subscriber) == [4]
    assert subscriber.seen.to_skip == set()


def test_mark_sent_with_a_floor_counts_every_lower_row_as_sent() -> None:
    """A resume from id 10 that the journal does not hold: the backfill routes 8..12 later;
    rows up to 10 never reach the stream, rows above it once."""
    hub = Hub(max_subscribers=10, queue_size=10)
    resumed, other = hub.subscribe("a", None), hub.subscribe("a", None)
    hub.publish(message(7))
    hub.mark_sent(resumed, [11], floor=10)
    assert ids(resumed) == [] and ids(other) == [7]
    for row_id in range(8, 13):
        hub.publish(message(row_id))
    assert ids(resumed) == [12]
    assert ids(other) == [8, 9, 10, 11, 12]


def test_rows_routed_before_subscribing_are_not_remembered() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    hub.publish(message(1))
    subscriber = hub.subscribe("a", None)
    hub.mark_sent(subscriber, [1])  # a replay from the journal: routed already, never again
    assert subscriber.seen is not None and subscriber.seen.to_skip == set()


def test_a_queue_full_by_bytes_closes_the_subscriber_as_one_full_by_count_does() -> None:
    hub = Hub(max_subscribers=10, queue_size=1000, queue_bytes=1000)
    slow, fast = hub.subscribe("a", None), hub.subscribe("a", None)
    big = Message(1, "a", None, "x" * 5000, False, True, None, "2026-01-01T00:00:00.000Z")
    hub.publish(big)  # an empty queue takes one event whatever its size
    assert ids(fast) == [1] and not slow.closed
    hub.publish(message(2))  # and nothing more past its bytes
    assert slow.closed and slow.close_reason and "slow consumer" in slow.close_reason
    assert ids(fast) == [2] and hub.counters.slow_consumer_disconnects == 1
    for n in range(3, 20):  # a reader that keeps up is never cut: taking frees the bytes
        hub.publish(message(n))
        hub.heartbeat()
        assert len(fast.take()) == 2
    assert not fast.closed


def test_a_row_reusing_a_delivered_id_resets_the_journal_and_what_streams_were_sent() -> None:
    """A copy of a delivered row is not new; a row with its id and another `created_at` is
    (the table's ids were reused): the journal and every stream's `seen` are forgotten."""
    hub = Hub(max_subscribers=10, queue_size=10)
    first = message(5)
    watcher = hub.subscribe("a", None)
    hub.publish(first)
    assert hub.publish(first) == 0 and ids(watcher) == [5]  # a copy: dropped by the hub
    subscriber = hub.subscribe("b", None)
    hub.mark_sent(subscriber, [], floor=5)
    reused = dataclasses.replace(first, session_id="b", created_at="2026-02-01T00:00:00.000Z")
    assert hub.publish(reused) == 1 and hub.counters.ids_reused == 1
    assert subscriber.seen is None and hub.reused_from == 5
    assert hub.journal.created_at(5) == reused.created_at


def test_a_stream_of_several_sessions_gets_each_row_once_and_counts_under_each() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    several = hub.subscribe(("a", "b", "c"), None)
    b_only = hub.subscribe("b", None)
    robot = hub.subscribe(("a", "c"), "r1")
    hub.publish(message(1, "a"))
    hub.publish(message(2, "b"))
    hub.publish(message(3, "z"))
    hub.publish(message(4, "c", "r1"))
    assert ids(several) == [1, 2, 4]
    assert ids(b_only) == [2]
    assert ids(robot) == [4]
    assert len(hub) == 3  # streams, not sessions
    assert hub.channels() == {
        "session_messages:a": 2,
        "session_messages:b": 2,
        "session_messages:c": 2,
    }
    assert sorted(len(s.sessions or ()) for s in hub.subscribers()) == [1, 2, 3]  # each once
    hub.heartbeat()
    assert [len(s.take()) for s in (several, b_only, robot)] == [1, 1, 1]

    hub.unsubscribe(several)
    hub.unsubscribe(several)  # a second time changes nothing
    assert len(hub) == 2
    assert hub.channels() == {f"session_messages:{s}": 1 for s in "abc"}
    hub.unsubscribe(robot)
    assert hub.channels() == {"session_messages:b": 1}


def test_repeated_sessions_of_one_stream_count_once() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    subscriber = hub.subscribe(("a", "a", "b"), None)
    assert subscriber.sessions == ("a", "b")
    hub.publish(message(1, "a"))
    assert ids(subscriber) == [1]
    assert hub.channels() == {"session_messages:a": 1, "session_messages:b": 1}


# Updates and deletes of the messages feed (`Hub.publish_change`).


def row_data(id_: int, session: str = "a", robot: str | None = None, content: str = "edited"):  # type: ignore[no-untyped-def]
    """A messages row as the capture trigger writes it in a change's `data`."""
    return {
        "id": id_,
        "session_id": session,
        "robot_id": robot,
        "content": content,
        "is_from_bot": False,
        "is_human": True,
        "intent": None,
        "created_at": "2026-01-01T00:00:00.000Z",
    }


def updated(position: int, data: dict, old: dict | None = None) -> Change:  # type: ignore[type-arg]
    return Change("messages", position, "update", data, old, "2026-01-01T00:00:01.000Z")


def deleted(position: int, id_: int, session: str = "a", robot: str | None = None) -> Change:
    data = {"id": id_, "session_id": session, "robot_id": robot}
    return Change("messages", position, "delete", data, None, "2026-01-01T00:00:01.000Z")


def bodies(subscriber) -> list[tuple[int, dict]]:  # type: ignore[no-untyped-def,type-arg]
    """(SSE id, JSON body) of each queued event."""
    out = []
    for event in subscriber.take():
        head, data = event.data.split(b"\n", 1)
        assert head == b"id: %d" % event.id and data.startswith(b"data: ")
        out.append((event.id, orjson.loads(data[len(b"data: ") :])))
    return out


def test_an_update_reaches_its_session_and_global_once_as_message_updated() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a, b, everything = hub.subscribe("a", None), hub.subscribe("b", None), hub.subscribe(None, None)
    assert hub.publish_change(updated(7, row_data(3, "a", content="fixed"))) == 2
    [(position, body)] = bodies(a)
    assert position == 7 and body["type"] == "message_updated"
    assert body["data"] == {
        "id": "3",
        "sessionId": "a",
        "robotId": None,
        "content": "fixed",
        "isFromBot": False,
        "isHuman": True,
        "intent": None,
        "createdAt": "2026-01-01T00:00:00.000Z",
    }
    assert [p for p, _ in bodies(everything)] == [7] and ids(b) == []
    assert hub.counters.events_delivered == 2


def test_an_update_moving_a_row_reaches_the_old_and_the_new_filter_once_each() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a, b, c = hub.subscribe("a", None), hub.subscribe("b", None), hub.subscribe("c", None)
    both = hub.subscribe(("a", "b"), None)
    everything = hub.subscribe(None, None)
    moved = updated(9, row_data(3, "b"), old={"session_id": "a"})
    assert hub.publish_change(moved) == 4
    assert [ids(s) for s in (a, b, c, both, everything)] == [[9], [9], [], [9], [9]]


def test_an_update_changing_the_robot_reaches_streams_of_either_robot() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    r1, r2, r3 = (hub.subscribe("a", r) for r in ("r1", "r2", "r3"))
    any_r1 = hub.subscribe(None, "r1")
    change = updated(5, row_data(2, "a", "r2"), old={"robot_id": "r1"})
    assert hub.publish_change(change) == 3
    assert [ids(s) for s in (r1, r2, r3, any_r1)] == [[5], [5], [], [5]]


def test_a_delete_reaches_only_streams_of_the_old_row() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a, b = hub.subscribe("a", None), hub.subscribe("b", None)
    a_r2, everything = hub.subscribe("a", "r2"), hub.subscribe(None, None)
    assert hub.publish_change(deleted(8, 3, "a", "r1")) == 2
    [(position, body)] = bodies(a)
    assert position == 8 and body["type"] == "message_deleted"
    assert body["data"] == {"id": "3", "sessionId": "a", "robotId": "r1"}
    assert ids(b) == [] and ids(a_r2) == [] and ids(everything) == [8]


def test_a_change_is_routed_once_and_its_routes_are_journaled_for_a_resume() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a = hub.subscribe("a", None)
    hub.publish(message(3, "a"))
    moved = updated(4, row_data(3, "b"), old={"session_id": "a"})
    assert hub.publish_change(moved) == 1
    assert hub.publish_change(moved) == 0  # a backfill's overlap, a bus entry twice
    hub.publish_change(deleted(5, 3, "b"))
    assert ids(a) == [3, 4]
    # A stream of `a` resuming from row 3 gets the move (its old route), not the delete.
    assert hub.journal.after(3, Filter.of("a")) == [4]
    assert hub.journal.after(3, Filter.of("b")) == [4, 5]
    assert [hub.journal.is_change(i) for i in (3, 4, 5)] == [False, True, True]


def test_a_change_already_sent_by_a_replay_is_skipped() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    a = hub.subscribe("a", None)
    hub.mark_sent(a, [6])
    assert hub.publish_change(updated(6, row_data(3, "a"))) == 0
    assert ids(a) == []


def test_an_edited_row_over_the_row_budget_is_cut_as_a_row_read_is() -> None:
    hub = Hub(max_subscribers=10, queue_size=10, max_row_bytes=10)
    a = hub.subscribe("a", None)
    hub.publish_change(updated(6, row_data(3, "a", content="é" * 20)))
    [(_, body)] = bodies(a)
    assert body["data"]["content"] == "é" * 5
    assert body["data"]["truncated"] is True and body["data"]["contentBytes"] == 40


@pytest.mark.parametrize(
    "data",
    [
        {"id": 3, "session_id": 5, "robot_id": None},
        {"id": "3", "session_id": "a", "robot_id": None},
        {"session_id": "a", "robot_id": None},
    ],
)
def test_a_change_that_is_not_a_messages_row_is_not_routed(data: dict) -> None:  # type: ignore[type-arg]
    hub = Hub(max_subscribers=10, queue_size=10)
    a = hub.subscribe("a", None)
    bad = Change("messages", 6, "delete", data, None, "2026-01-01T00:00:01.000Z")
    assert hub.publish_change(bad) == 0
    assert hub.publish_change(updated(7, {**row_data(3), "content": 1})) == 0
    assert ids(a) == [] and 6 not in hub.journal


def test_an_insert_that_comes_as_a_change_is_routed_as_its_row() -> None:
    """The messages feed's inserts are not captured (its trigger notifies them as rows), but
    one that came as a change is routed as `publish` routes the row: a `message`, once."""
    hub = Hub(max_subscribers=10, queue_size=10)
    a = hub.subscribe("a", None)
    insert = Change("messages", 3, "insert", row_data(3, "a", content="hi"), None, "")
    assert hub.publish_change(insert) == 1
    assert hub.publish(message(3, "a")) == 0  # a copy of the row the journal holds
    [(position, body)] = bodies(a)
    assert position == 3 and body["type"] == "message" and body["data"]["content"] == "hi"
