"""broker.service in process, against the test cluster: the running broker listens, wires
the flusher, opens streams with their replay plan, and closes them on the way out."""

from __future__ import annotations

import asyncio

import pytest

from broker.config.settings import Settings
from broker.errors import AtCapacity
from broker.service import SHUTDOWN, Broker
from tests.support.database import Database


async def test_a_running_broker_opens_and_closes_streams(
    database: Database, session_id: str
) -> None:
    settings = Settings(database_url=database.url, max_connections=2, heartbeat_seconds=60)
    async with Broker.running(settings) as broker:
        await asyncio.wait_for(broker.listener.started.wait(), 10)
        assert broker.hub.on_idle_ready is not None  # idle streams are written by the flusher
        live, no_replay = broker.open_stream(session_id, None)
        resumed, replay = broker.open_stream(session_id, None, last_event_id=5)
        assert no_replay is None and replay is not None and replay.after == 5
        with pytest.raises(AtCapacity):
            broker.open_stream(session_id, None)
        assert len(broker.hub) == 2
    assert live.closed and resumed.closed
    assert live.close_reason == resumed.close_reason == SHUTDOWN
