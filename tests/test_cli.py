"""The command line: bad settings stop start-up with one line; the embedded database path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.support.processes import BrokerProcess


def run_broker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("env", "args", "setting"),
    [
        ({"BROKER_PORT": "http"}, (), "BROKER_PORT"),
        ({"BROKER_HEARTBEAT_SECONDS": "0"}, (), "BROKER_HEARTBEAT_SECONDS"),
        ({}, ("--max-connections", "-5"), "BROKER_MAX_CONNECTIONS"),
        ({}, ("--log-format", "yaml"), "BROKER_LOG_FORMAT"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(
    env: dict[str, str], args: tuple[str, ...], setting: str
) -> None:
    result = run_broker("serve", *args, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0] and lines[0].startswith("broker: invalid")


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    result = run_broker("migrate", DATABASE_URL=f"postgresql://nobody@/db?host={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("broker: migration failed")


def test_publish_inserts_and_prints_the_stored_message(database: Database, session_id: str) -> None:
    result = run_broker(
        "publish",
        "--session",
        session_id,
        "--robot",
        "r1",
        "hé 你好",
        DATABASE_URL=database.url,
        BROKER_LOG_FORMAT="json",
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["sessionId"] == session_id and printed["content"] == "hé 你好"
    rows = database.query(
        "SELECT content, robot_id FROM messages WHERE id = %s", (int(printed["id"]),)
    )
    assert rows == [("hé 你好", "r1")]


def test_migrate_is_idempotent_and_safe_in_parallel(database: Database) -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "broker", "migrate"],
            env={**os.environ, "DATABASE_URL": database.url, "BROKER_LOG_FORMAT": "json"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for run in runs:
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
    triggers = database.query(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'trigger_notify_new_message'"
    )
    assert triggers == [(1,)]


async def test_serve_without_database_url_starts_the_embedded_postgres(
    tmp_path: Path, session_id: str
) -> None:
    """What `make run` does on a fresh clone: no DATABASE_URL, data under the data dir."""
    env = {key: "" for key in ("DATABASE_URL", "PGDATABASE_URL")}
    broker = BrokerProcess(
        {**env, "BROKER_DATA_DIR": str(tmp_path / "data"), "BROKER_LOG_FORMAT": "json"},
        tmp_path / "broker.log",
    )
    try:
        broker.start(timeout=60)
        assert (tmp_path / "data" / "PG_VERSION").exists()
        published = run_broker(
            "publish",
            "--session",
            session_id,
            "hello",
            BROKER_DATA_DIR=str(tmp_path / "data"),
            **env,
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["content"] == "hello"
    finally:
        broker.stop()
    assert broker.wait() == 0
    events = [e["event"] for e in broker.log_events()]
    assert "embedded_postgres_started" in events and "embedded_postgres_stopped" in events
