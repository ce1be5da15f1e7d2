"""Feed tests' database: a fresh database of its own on the test cluster per test, so that
capture triggers and the `pgsse` schema of one test never reach another (or the other tests'
`messages`), and a config file declaring the orders feed.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from broker.signing import SIGNATURE_CHARS
from tests.support.database import Database

ORDERS_TABLE = """
CREATE SCHEMA shop;
CREATE TABLE shop.orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text NOT NULL,
    status      text NOT NULL,
    region      text,
    total       numeric(10, 2),
    note        text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""

ORDERS_CONFIG = """
[feeds.messages]
events = ["insert", "update", "delete"]

[feeds.orders]
table = "shop.orders"
key = "customer_id"
filters = ["status", "region"]
columns = ["id", "customer_id", "status", "total", "updated_at"]
events = ["insert", "update", "delete"]
"""


class Scratch:
    """A database of its own: its URL and plain-SQL helpers."""

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def query(self, text: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cursor = conn.execute(text.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def execute(self, text: str, params: tuple[Any, ...] = ()) -> None:
        with self.connect() as conn:
            conn.execute(text.encode(), params or None)

    def triggers(self) -> set[tuple[str, str]]:
        """(table, trigger) of every capture trigger."""
        rows = self.query(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger"
            " WHERE tgname LIKE 'pgsse\\_capture\\_%' AND NOT tgisinternal"
        )
        return {(str(table), str(name)) for table, name in rows}

    def installed(self) -> bool:
        """Whether anything of `pgsse migrate` is in the database."""
        rows = self.query(
            "SELECT to_regnamespace('pgsse') IS NOT NULL OR to_regclass('messages') IS NOT NULL"
        )
        return bool(rows[0][0])


@contextmanager
def scratch_database(database: Database) -> Iterator[Scratch]:
    name = f"feeds_{uuid.uuid4().hex[:10]}"
    with database.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(database.url)
    try:
        yield Scratch(urlunsplit(parts._replace(path="/" + name)))
    finally:
        with database.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def migrated(
    database: Database, directory: Path, table: str, config: str
) -> Iterator[tuple[Scratch, Path]]:
    """A scratch database holding `table` (SQL), migrated with the feeds file `config`."""
    from broker.database import migrate

    with scratch_database(database) as scratch:
        scratch.execute(table)
        path = write_config(directory, config)
        migrate(scratch.url, path)
        yield scratch, path


def pgsse(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`pgsse ARGS` as a process against `url`."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env={"DATABASE_URL": url, "BROKER_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(directory: Path, text: str, name: str = "pgsse.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def unsigned(payload: str) -> str:
    """A capture notification's JSON, after its signature (`broker.signing`)."""
    return payload[SIGNATURE_CHARS:] if payload[:1] != "{" else payload
