"""The feeds tier's fixtures: `waldb`, a database of its own in wal mode (tests/support/wal.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.database import Database
from tests.support.wal import WalDatabase, wal_database


@pytest.fixture
def waldb(database: Database) -> Iterator[WalDatabase]:
    with wal_database(database) as wal:
        yield wal
