"""The feeds file: every mistake stops `migrate` with one line naming the feed and the field,
and nothing is installed."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import feeds as feedspec
from broker.errors import ConfigError
from tests.support.database import Database
from tests.support.feeds import (
    ORDERS_CONFIG,
    ORDERS_TABLE,
    Scratch,
    pgsse,
    scratch_database,
    write_config,
)


@pytest.fixture
def scratch(database: Database) -> Iterator[Scratch]:
    with scratch_database(database) as scratch:
        yield scratch


@pytest.fixture
def shop(scratch: Scratch) -> Scratch:
    scratch.execute(ORDERS_TABLE)
    scratch.execute("CREATE TABLE shop.audit (at timestamptz, what text)")  # no primary key
    scratch.execute("CREATE VIEW shop.open_orders AS SELECT * FROM shop.orders")
    return scratch


def parse_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        feedspec.parse(tomllib.loads(text))
    return str(caught.value)


ORDERS = '[feeds.orders]\ntable = "shop.orders"\nkey = "customer_id"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[feeds."Orders!"]\ntable = "t"\nkey = "k"',
            "feeds.Orders!: the feed name must be 1 to 49 of a-z, 0-9, _ and -",
        ),
        ('[feeds.stats]\ntable = "t"\nkey = "k"', "feeds.stats: the feed name 'stats' is reserved"),
        (ORDERS + 'events = ["insert", "upsert"]', 'feeds.orders.events: unknown event "upsert"'),
        (ORDERS + "events = []", "feeds.orders.events: must name at least one"),
        (
            ORDERS + 'filter = ["status"]',
            'feeds.orders.filter: unknown field (did you mean "filters"?)',
        ),
        ('[feeds.orders]\nkey = "customer_id"', "feeds.orders.table: required, a string"),
        ('[feeds.orders]\ntable = "shop.orders"', "feeds.orders.key: required, a string"),
        (ORDERS + 'filters = "status"', "feeds.orders.filters: must be a list of strings"),
        (ORDERS + 'filters = ["customer_id"]', 'feeds.orders.filters: "customer_id" is the key'),
        (ORDERS + 'columns = ["id", "id"]', 'feeds.orders.columns: "id" is listed twice'),
        (
            '[feeds.orders]\ntable = "a.b.c"\nkey = "k"',
            "feeds.orders.table: must be NAME or SCHEMA.NAME",
        ),
        ('[feeds.messages]\nkey = "robot_id"', 'feeds.messages.key: must be "session_id"'),
        ('[feeds.messages]\nfilters = ["intent"]', 'feeds.messages.filters: must be ["robot_id"]'),
        ('[feeds.messages]\ntable = "chat"', 'feeds.messages.table: must be "messages"'),
        ('[feeds.messages]\ncolumns = ["id"]', "feeds.messages.columns: not allowed"),
        ('[feeds.messages]\nevents = ["update"]', 'feeds.messages.events: must include "insert"'),
        ("[feed.orders]", 'feed: unknown section (did you mean "feeds"?)'),
        ("", "feeds: must declare at least one feed"),
    ],
)
def test_each_mistake_is_one_line_naming_feed_and_field(text: str, expected: str) -> None:
    message = parse_error(text)
    assert message.startswith(expected)
    assert "\n" not in message


def test_the_messages_feed_defaults_to_the_guides_shape() -> None:
    (declared,) = feedspec.parse(tomllib.loads('[feeds.messages]\nevents = ["insert", "delete"]'))
    assert (declared.table, declared.key, declared.filters) == (
        "messages",
        "session_id",
        ("robot_id",),
    )
    assert declared.events == ("insert", "delete")


def test_no_file_is_the_messages_feed_inserts_only() -> None:
    (declared,) = feedspec.read(None)
    assert declared.name == "messages" and declared.events == ("insert",)


def test_a_file_that_is_not_toml_names_the_setting(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[feeds.orders\n")
    with pytest.raises(ConfigError, match=r"^invalid BROKER_CONFIG='.*': not TOML"):
        feedspec.read(path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            'table = "shop.order"\nkey = "customer_id"',
            'feeds.orders.table: no table "shop.order" (did you mean "shop.orders"?)',
        ),
        ('table = "orders"\nkey = "customer_id"', 'feeds.orders.table: no table "orders"'),
        ('table = "shop.audit"\nkey = "what"', "feeds.orders.table: shop.audit has no primary key"),
        (
            'table = "shop.open_orders"\nkey = "id"',
            'feeds.orders.table: "shop.open_orders" is not a table',
        ),
        (
            'table = "shop.orders"\nkey = "customer"',
            'feeds.orders.key: column "customer" not in shop.orders (did you mean "customer_id"?)',
        ),
        (
            'table = "shop.orders"\nkey = "customer_id"\nfilters = ["statu"]',
            'feeds.orders.filters: column "statu" not in shop.orders (did you mean "status"?)',
        ),
        (
            'table = "shop.orders"\nkey = "customer_id"\ncolumns = ["id", "totl"]',
            'feeds.orders.columns: column "totl" not in shop.orders (did you mean "total"?)',
        ),
    ],
)
def test_each_catalog_mistake_is_one_line_naming_feed_and_field(
    shop: Scratch, spec: str, expected: str
) -> None:
    declared = feedspec.parse(tomllib.loads("[feeds.orders]\n" + spec))
    with shop.connect() as conn, pytest.raises(ConfigError) as caught:
        feedspec.resolve(conn, declared)
    assert str(caught.value) == expected or str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_a_feed_holds_primary_key_key_and_filters_besides_its_columns(shop: Scratch) -> None:
    spec = ORDERS + 'filters = ["status"]\ncolumns = ["total", "updated_at"]'
    with shop.connect() as conn:
        (feed,) = feedspec.resolve(conn, feedspec.parse(tomllib.loads(spec)))
    assert feed.columns == ("total", "updated_at", "id", "customer_id", "status")
    assert feed.primary_key == ("id",)
    assert feed.timestamptz == ("updated_at",)
    assert feed.route == ("customer_id", "status", "id")
    assert (feed.schema, feed.table) == ("shop", "orders")


def test_migrate_with_a_bad_file_exits_non_zero_with_one_line_and_installs_nothing(
    shop: Scratch, tmp_path: Path
) -> None:
    bad = write_config(tmp_path, ORDERS_CONFIG.replace('"status", "region"', '"statu", "region"'))
    result = pgsse("migrate", "--config", str(bad), url=shop.url)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        'pgsse: feeds.orders.filters: column "statu" not in shop.orders (did you mean "status"?)'
    ]
    assert not shop.installed()  # neither sql/ nor the pgsse schema
    assert shop.triggers() == set()


def test_migrate_with_a_missing_file_names_the_setting(scratch: Scratch, tmp_path: Path) -> None:
    result = pgsse("migrate", "--config", str(tmp_path / "none.toml"), url=scratch.url)
    assert result.returncode == 2
    assert "invalid BROKER_CONFIG=" in result.stderr and "no such file" in result.stderr
    assert not scratch.installed()
