"""broker.config.options: a setting declared once on a dataclass field becomes its `Option`
(env var, flag, parser, help, default as shown), and raw values parse or fail naming the
setting. Tested on a small dataclass of its own; `Settings` itself is test_settings'."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from broker.config.options import Option, declared_options, parse_raw, setting
from broker.config.parsers import (
    boolean,
    database_url,
    positive_float,
    positive_int,
    redact_url,
    text,
)
from broker.errors import ConfigError


@dataclass(frozen=True)
class Sample:
    queue_size: int = setting(100, "SAMPLE_QUEUE_SIZE", positive_int, "events held per stream")
    wait_seconds: float = setting(2.5, "SAMPLE_WAIT", positive_float, "how long")
    verbose: bool = setting(False, "SAMPLE_VERBOSE", boolean, "say more")
    url: str | None = setting(
        None, "SAMPLE_URL", database_url, "the database", redact=redact_url, fallback_env="OLD_URL"
    )
    origins: tuple[str, ...] = setting((), "SAMPLE_ORIGINS", text, "allowed origins")
    token: str | None = setting(None, "SAMPLE_TOKEN", positive_int, "a secret", secret=True)
    data_dir: str = setting(".data", "SAMPLE_DIR", text, "where", shown_default="./.data")


OPTIONS = declared_options(Sample)


def option(field: str) -> Option:
    return next(option for option in OPTIONS if option.field == field)


def test_one_option_per_field_in_order_with_what_setting_declared() -> None:
    assert [o.field for o in OPTIONS] == [f.name for f in dataclasses.fields(Sample)]
    queue = option("queue_size")
    assert (queue.env, queue.flag, queue.value, queue.help) == (
        "SAMPLE_QUEUE_SIZE",
        "--queue-size",
        100,
        "events held per stream",
    )
    assert queue.parse is positive_int and not queue.secret and queue.fallback_env is None
    assert Sample().queue_size == 100  # the field's default is the declared one


def test_a_secret_field_stays_out_of_repr() -> None:
    shown = repr(Sample(token="hunter2-token"))
    assert "hunter2" not in shown and "queue_size=100" in shown


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("queue_size", "100"),
        ("wait_seconds", "2.5"),
        ("verbose", "false"),
        ("url", "unset"),
        ("origins", "unset"),
        ("data_dir", "./.data"),
    ],
)
def test_the_default_as_help_shows_it(field: str, text: str) -> None:
    assert option(field).default_text() == text


def test_an_error_quotes_a_value_redacted_or_not_at_all() -> None:
    assert option("queue_size").shown("abc") == "'abc'"
    assert option("url").shown("postgresql://u:pw@h/db") == "'postgresql://u:***@h/db'"
    assert option("token").shown("hunter2") == "<hidden>"


def test_read_takes_the_variable_then_its_fallback_and_empty_is_unset() -> None:
    url = option("url")
    assert (
        url.read({"SAMPLE_URL": "postgresql://a", "OLD_URL": "postgresql://b"}) == "postgresql://a"
    )
    assert url.read({"SAMPLE_URL": "", "OLD_URL": "postgresql://b"}) == "postgresql://b"
    assert url.read({}) == ""
    assert option("queue_size").read({"SAMPLE_QUEUE_SIZE": ""}) == ""


def test_parse_raw_parses_only_the_values_given() -> None:
    values = parse_raw(OPTIONS, {"queue_size": "7", "verbose": "on", "url": "postgres://h/db"})
    assert values == {"queue_size": 7, "verbose": True, "url": "postgresql://h/db"}
    assert parse_raw(OPTIONS, {}) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"queue_size": "many"}, "invalid SAMPLE_QUEUE_SIZE='many': not a number"),
        ({"wait_seconds": "x"}, "invalid SAMPLE_WAIT='x': not a number"),
        ({"queue_size": "0"}, "invalid SAMPLE_QUEUE_SIZE='0': must be at least 1"),
        ({"token": "hunter2"}, "invalid SAMPLE_TOKEN=<hidden>: not a number"),
        (
            {"url": "mysql://u:pw@h/db"},
            "invalid SAMPLE_URL='mysql://u:***@h/db': must be a postgresql:// URL"
            " (or libpq key=value pairs)",
        ),
    ],
)
def test_an_invalid_value_is_one_config_error_naming_the_variable(
    raw: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_raw(OPTIONS, raw)
    assert str(caught.value) == message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_the_first_invalid_setting_in_declaration_order_is_named() -> None:
    with pytest.raises(ConfigError, match="SAMPLE_QUEUE_SIZE"):
        parse_raw(OPTIONS, {"verbose": "maybe", "queue_size": "x"})
