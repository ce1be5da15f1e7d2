"""broker.config.parsers: each parser's accepted values and its refusals, at the edges. How a
refusal becomes one line naming the setting is settings' and options' (test_settings,
test_options)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from broker.config import parsers

ACCEPTED: list[tuple[Callable[[str], Any], str, Any]] = [
    (parsers.positive_int, "1", 1),
    (parsers.positive_int, "10000", 10_000),
    (parsers.port, "0", 0),
    (parsers.port, "65535", 65535),
    (parsers.admin_port, "1", 1),
    (parsers.admin_port, "65535", 65535),
    (parsers.positive_float, "0.001", 0.001),
    (parsers.positive_float, "30", 30.0),
    (parsers.header_bytes, "1024", 1024),
    (parsers.origins, "", ()),
    (parsers.origins, "*", ("*",)),
    (
        parsers.origins,
        " https://a.example , http://b.example:3000,",
        (
            "https://a.example",
            "http://b.example:3000",
        ),
    ),
    (parsers.secrets, "k" * 32, ("k" * 32,)),
    (parsers.secrets, f"{'a' * 32}, {'b' * 40}", ("a" * 32, "b" * 40)),
    (parsers.secrets, "é" * 16, ("é" * 16,)),  # 32 bytes in UTF-8: bytes count, not letters
    (parsers.admin_token, "!" * 15 + "~", "!" * 15 + "~"),
    (parsers.networks, "", ()),
    (
        parsers.networks,
        "10.0.0.1/8, ::1",
        (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ),
    ),
    (parsers.bus_url, " redis://h:6379/0 ", "redis://h:6379/0"),
    (parsers.bus_url, "rediss://h", "rediss://h"),
    (parsers.bus_url, "unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    (parsers.stream_key, "pgsse:messages", "pgsse:messages"),
    (parsers.stream_key, "k" * 512, "k" * 512),
    (parsers.log_level, "WARNING", "warning"),
    (parsers.log_format, "console", "console"),
    (parsers.boolean, " Yes ", True),
    (parsers.boolean, "off", False),
    (parsers.text, " as is ", " as is "),
    (parsers.database_url, "postgresql+psycopg://u:p@h:5432/db", "postgresql://u:p@h:5432/db"),
    (parsers.database_url, "postgresql+psycopg2://u@h/db", "postgresql://u@h/db"),
    (
        parsers.database_url,
        "postgres://u@h/db?sslmode=require",
        "postgresql://u@h/db?sslmode=require",
    ),
    (parsers.database_url, "POSTGRESQL://u@h/db", "postgresql://u@h/db"),
    (
        parsers.database_url,
        "postgresql://u@/db?host=/run/postgresql",
        "postgresql://u@/db?host=/run/postgresql",
    ),
    (parsers.database_url, " host=h dbname=db user=u ", "host=h dbname=db user=u"),
]


@pytest.mark.parametrize(("parse", "text", "value"), ACCEPTED)
def test_accepted(parse: Callable[[str], Any], text: str, value: Any) -> None:
    assert parse(text) == value


REFUSED: list[tuple[Callable[[str], Any], str, str]] = [
    (parsers.positive_int, "0", "at least 1"),
    (parsers.positive_int, "1.5", "invalid literal"),
    (parsers.port, "-1", "0 to 65535"),
    (parsers.port, "65536", "0 to 65535"),
    (parsers.admin_port, "0", "1 to 65535"),
    (parsers.positive_float, "0", "positive"),
    (parsers.positive_float, "-0.5", "positive"),
    (parsers.positive_float, "nan", "positive"),
    (parsers.positive_float, "inf", "positive"),
    (parsers.header_bytes, "1023", "at least 1024"),
    (parsers.origins, "app.example", "exact origin"),
    (parsers.origins, "https://a.example/", "exact origin"),  # never matches a browser's
    (parsers.origins, "https://a.example/path", "exact origin"),
    (parsers.origins, "https://user@a.example", "exact origin"),
    (parsers.origins, "https://a.example:99999", "exact origin"),
    (parsers.origins, "ftp://a.example", "exact origin"),
    (parsers.secrets, " , ", "at least one secret"),
    (parsers.secrets, f"{'a' * 32},{'b' * 31}", "at least 32 bytes"),
    (parsers.admin_token, "x" * 15, "at least 16"),
    (parsers.admin_token, "x" * 16 + " y", "printable ASCII"),
    (parsers.admin_token, "x" * 16 + "é", "printable ASCII"),
    (parsers.networks, "10.0.0.0/8,example.com", "'example.com' is not an IP"),
    (parsers.bus_url, "http://h:6379", "redis://, rediss:// or unix://"),
    (parsers.bus_url, "redis://:6379/0", "needs a host"),
    (parsers.bus_url, "redis://h:port/0", "invalid port"),
    (parsers.stream_key, "", "1 to 512"),
    (parsers.stream_key, " key", "1 to 512"),
    (parsers.stream_key, "k" * 513, "1 to 512"),
    (parsers.log_level, "verbose", "debug, info, warning, error"),
    (parsers.log_format, "JSON", "'json' or 'console'"),
    (parsers.boolean, "maybe", "true or false"),
    (parsers.database_url, "mysql://h/db", "postgresql://"),
    (parsers.database_url, "host=h nope=1", "nope"),
]


@pytest.mark.parametrize(("parse", "text", "reason"), REFUSED)
def test_refused_with_its_reason(parse: Callable[[str], Any], text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse(text)
    assert reason in str(caught.value)


@pytest.mark.parametrize("text", ["short", "a" * 31, f"{'a' * 32},hunter2"])
def test_a_secret_is_never_quoted_in_its_reason(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parsers.secrets(text)
    assert "hunter2" not in str(caught.value) and text not in str(caught.value)


def test_a_refused_database_url_hides_its_password() -> None:
    with pytest.raises(ValueError) as caught:
        parsers.database_url("postgresql://u:hunter2@h/db?nope=1")
    assert "nope" in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("postgresql://u:hunter2@h/db", "postgresql://u:***@h/db"),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h password=hunter2 user=u", "host=h password=*** user=u"),
        ("host=h password='hun ter\\'2' user=u", "host=h password=*** user=u"),
        (
            "postgresql://h/db?password=hunter2&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
    ],
)
def test_redact_url_hides_every_form_of_password(text: str, redacted: str) -> None:
    assert parsers.redact_url(text) == redacted


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("604800", 604800.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0)],
)
def test_a_duration_is_seconds_or_a_number_with_a_unit(text: str, seconds: float) -> None:
    assert parsers.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "-1d", "0", "1w", "d"])
def test_a_bad_duration_says_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        parsers.duration(text)
