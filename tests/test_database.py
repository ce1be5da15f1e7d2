"""broker.database: the start-up checks of a database, and the embedded PostgreSQL's checks that
need no cluster of their own. Clusters created and started: tests/system/test_database.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from psycopg import sql

from broker.database import EmbeddedPostgres, check_database, connect, migrate
from broker.errors import BrokerError, ConfigError
from tests.support.database import Database, chain_modes

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="root's placement of the server's files")


def test_the_test_suite_cluster_changed_no_directory(database: Database) -> None:
    assert chain_modes(database.root) == database.modes_before


@as_root
def test_an_existing_cluster_the_server_user_cannot_reach_is_one_clear_error(home: Path) -> None:
    (home / "data").mkdir()
    (home / "data" / "PG_VERSION").write_text("16\n")
    with pytest.raises(ConfigError) as caught:
        EmbeddedPostgres(home / "data").start()
    message = str(caught.value)
    assert "BROKER_DATA_DIR" in message and "pgserver" in message and "\n" not in message


def test_a_stale_pid_file_is_not_a_running_server() -> None:
    """After a crash the pid in postmaster.pid may belong to another process by now."""
    top = Path(tempfile.mkdtemp(prefix="pgsse-stale-"))
    try:
        top.chmod(0o755)
        data = top / "data"
        data.mkdir()
        (data / "PG_VERSION").write_text("16\n")
        server = EmbeddedPostgres(data)
        assert server.data_dir == data and not server.is_running()
        (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n")  # alive, not postgres
        assert not server.is_running()
        (data / "postmaster.pid").write_text("4194999\n")  # no such process
        assert not server.is_running()
    finally:
        shutil.rmtree(top)


def test_unreachable_database_is_one_line_naming_the_url_without_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://someone:hunter2hunter2@/db?host={tmp_path}"
    with pytest.raises(BrokerError) as caught:
        connect(url)
    message = str(caught.value)
    assert message.startswith("cannot connect to DATABASE_URL=postgresql://someone:***@/db")
    assert "hunter2" not in message and "\n" not in message


def test_a_database_without_the_table_names_broker_migrate(database: Database) -> None:
    name = f"empty_{uuid.uuid4().hex[:8]}"
    with database.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        empty = database.url.replace("/postgres?", f"/{name}?")
        with pytest.raises(BrokerError) as caught:
            check_database(empty)
        assert "BROKER_MIGRATE" in str(caught.value) and "messages" in str(caught.value)
        migrate(empty)
        check_database(empty)  # no error once migrated
    finally:
        with database.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
