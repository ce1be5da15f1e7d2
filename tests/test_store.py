"""broker.store in-process, against the test cluster: rows mapped to `Message` by column name,
the replay queries' order and byte budget, and the plain-value queries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.filters import Filter
from broker.store import Store
from tests.support.database import Database


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    async with Store.open(database.url) as store:
        yield store


async def test_insert_and_get_map_every_column_by_name(store: Store, session_id: str) -> None:
    inserted = await store.insert(session_id, "hi 你好", "r1", True, False, "greet")
    content = (inserted.session_id, inserted.robot_id, inserted.content)
    assert content == (session_id, "r1", "hi 你好")
    assert (inserted.is_from_bot, inserted.is_human, inserted.intent) == (True, False, "greet")
    assert isinstance(inserted.id, int) and inserted.created_at.endswith("Z")
    assert await store.get(inserted.id) == inserted
    assert await store.get(-1) is None


async def test_replay_queries_keep_their_order_and_budget(
    store: Store, database: Database, session_id: str
) -> None:
    ids = [database.insert(session_id, "x" * 1000) for _ in range(4)]
    after = await store.after(ids[0], 10, Filter.of(session_id))
    assert [m.id for m in after] == ids[1:]
    budget = await store.after(0, 10, Filter.of(session_id), max_bytes=1)
    assert [m.id for m in budget] == ids[:1]  # one row always, however small the budget
    assert [m.id for m in await store.in_order(ids[::-1], 10_000)] == ids[::-1]
    assert sorted(await store.by_ids([*ids, -1])) == ids
    assert await store.oldest_of_last(2, Filter.of(session_id)) == ids[2]
    assert await store.oldest_of_last(2, Filter.of(session_id + "-none")) is None
    assert (await store.ids_after(ids[1]))[:2] == ids[2:]
    assert await store.last_id() >= ids[-1]


async def test_a_row_over_max_row_bytes_is_read_cut_and_flagged(
    database: Database, session_id: str
) -> None:
    content = "a" + "你" * 5000  # 15,001 bytes; the cut must not split a character
    row_id = database.insert(session_id, content)
    async with Store.open(database.url, max_row_bytes=8192) as store:
        reads = [
            await store.get(row_id),
            (await store.by_ids([row_id]))[row_id],
            (await store.after(row_id - 1, 1, Filter.of(session_id)))[0],
            (await store.after(row_id - 1, 1, Filter.of(session_id), max_bytes=10**6))[0],
            (await store.in_order([row_id], 10**6))[0],
        ]
    cut = "a" + "你" * 2730  # 8,191 bytes: the next character would make 8,194
    for message in reads:
        assert message is not None
        assert (message.content, message.content_bytes) == (cut, 15_001)
        assert message.as_json()["truncated"] is True
    async with Store.open(database.url, max_row_bytes=16_384) as store:
        whole = await store.get(row_id)
    assert whole is not None and (whole.content, whole.content_bytes) == (content, None)
    assert "truncated" not in whole.as_json()
