"""Settings: read once from the environment (and `broker serve` flags), validated at once.

Every setting has one `Option` below; the environment variable, the command-line flag, the
default and the check all come from it, so the three can never drift apart. An invalid value
raises `ConfigError` with a one-line message naming the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigError

__all__ = ["LOG_LEVELS", "OPTIONS", "Option", "Settings", "redact_url"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(part.strip() for part in text.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not _is_origin(origin):
            raise ValueError(f"{origin!r} is not '*' or an exact origin like https://host[:port]")
    return origins


def _is_origin(text: str) -> bool:
    """An exact browser origin: scheme and host (and port), nothing else. The CORS check
    compares strings, so a trailing slash or a path would silently never match."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and not (parts.path or parts.query or parts.fragment)
        and text == f"{parts.scheme}://{parts.netloc}"
    )


MIN_SECRET_BYTES = 32  # HS256: a key shorter than the hash output weakens it
MIN_ADMIN_TOKEN_LENGTH = 16


def _secrets(text: str) -> tuple[str, ...]:
    # Messages here never quote the value: it is a secret.
    secrets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not secrets:
        raise ValueError("must list at least one secret")
    if any(len(secret.encode()) < MIN_SECRET_BYTES for secret in secrets):
        raise ValueError(f"each comma-separated secret must be at least {MIN_SECRET_BYTES} bytes")
    return secrets


def _admin_token(text: str) -> str:
    if len(text) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters")
    if not all("!" <= char <= "~" for char in text):
        raise ValueError("must be printable ASCII without spaces (it travels in a header)")
    return text


def _admin_port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _header_bytes(text: str) -> int:
    value = int(text)
    if value < 1024:
        raise ValueError("must be at least 1024")
    return value


_DRIVER_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+[a-z0-9_]+)?://", re.IGNORECASE)


def _database_url(text: str) -> str:
    """A libpq connection string. SQLAlchemy-style `postgresql+psycopg://` and Heroku-style
    `postgres://` URLs are accepted and normalised to `postgresql://`."""
    text = text.strip()
    if "://" in text:
        if not _DRIVER_SCHEME.match(text):
            raise ValueError("must be a postgresql:// URL (or libpq key=value pairs)")
        text = _DRIVER_SCHEME.sub("postgresql://", text, count=1)
    try:
        conninfo_to_dict(text)
    except psycopg.Error as exc:
        raise ValueError(redact_url(" ".join(str(exc).split()))) from None
    return text


def redact_url(text: str) -> str:
    """`text` with any password replaced by `***`, fit for a log line or an error message."""
    text = re.sub(r"(://[^:/?#@]*:)[^@/?#]*@", r"\1***@", text)
    return re.sub(r"(password=)('(?:[^'\\]|\\.)*'|[^\s&]*)", r"\1***", text)


LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def _log_format(text: str) -> str:
    if text not in ("json", "console"):
        raise ValueError("must be 'json' or 'console'")
    return text


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _text(text: str) -> str:
    return text


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its field on `Settings`, environment variable and parser."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # never echo the value in an error message
    redact: Callable[[str], str] | None = None  # what of the value an error message may show
    default: str | None = None  # the default, in words, when the field's value does not say it

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def default_text(self) -> str:
        """The default as help shows it: `default`, else the `Settings` field's value."""
        if self.default is not None:
            return self.default
        value = Settings.__dataclass_fields__[self.field].default
        if value is None or value == ():
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def shown(self, value: str) -> str:
        """`value` as an error message may quote it."""
        if self.secret:
            return "<hidden>"
        return repr(value if self.redact is None else self.redact(value))


OPTIONS: tuple[Option, ...] = (
    Option(
        "database_url",
        "DATABASE_URL",
        _database_url,
        "PostgreSQL URL (postgresql://, postgres:// or postgresql+psycopg://)",
        redact=redact_url,
        default="unset: an embedded PostgreSQL under BROKER_DATA_DIR",
    ),
    Option(
        "host",
        "BROKER_HOST",
        _text,
        "address to listen on",
        default="127.0.0.1 with the embedded PostgreSQL, else 0.0.0.0",
    ),
    Option("port", "BROKER_PORT", _port, "port to listen on"),
    Option(
        "max_connections",
        "BROKER_MAX_CONNECTIONS",
        _positive_int,
        "open streams at most; one more is answered 503",
    ),
    Option(
        "heartbeat_seconds",
        "BROKER_HEARTBEAT_SECONDS",
        _positive_float,
        "seconds between heartbeat events",
    ),
    Option(
        "queue_size",
        "BROKER_QUEUE_SIZE",
        _positive_int,
        "events queued per subscriber before it is closed as a slow consumer",
    ),
    Option("retry_ms", "BROKER_RETRY_MS", _positive_int, "the SSE retry: hint, milliseconds"),
    Option(
        "replay_limit", "BROKER_REPLAY_LIMIT", _positive_int, "most rows replayed on one connection"
    ),
    Option(
        "cors_origins",
        "BROKER_CORS_ORIGINS",
        _origins,
        "comma-separated origins allowed by CORS, '*' for any",
    ),
    Option(
        "log_format",
        "BROKER_LOG_FORMAT",
        _log_format,
        "json or console",
        default="console on a terminal, else json",
    ),
    Option(
        "log_level",
        "BROKER_LOG_LEVEL",
        _log_level,
        "debug, info, warning or error; streams opening and closing are logged at debug",
    ),
    Option("data_dir", "BROKER_DATA_DIR", Path, "where the embedded PostgreSQL keeps its data"),
    Option("migrate", "BROKER_MIGRATE", _boolean, "apply sql/ at start-up"),
    Option(
        "shutdown_grace_seconds",
        "BROKER_SHUTDOWN_GRACE_SECONDS",
        _positive_float,
        "seconds given to streams to close on SIGTERM",
    ),
    Option(
        "auth_secret",
        "BROKER_AUTH_SECRET",
        _secrets,
        "comma-separated HS256 secrets: the first signs, all verify; unset: no auth",
        secret=True,
    ),
    Option(
        "admin_token",
        "BROKER_ADMIN_TOKEN",
        _admin_token,
        "bearer token required by /api/sse/stats and /metrics",
        secret=True,
    ),
    Option(
        "admin_port",
        "BROKER_ADMIN_PORT",
        _admin_port,
        "separate port serving /api/sse/stats and /metrics (404 on the public port)",
    ),
    Option(
        "admin_host",
        "BROKER_ADMIN_HOST",
        _text,
        "address of the admin port",
        default="BROKER_HOST",
    ),
    Option(
        "max_streams_per_ip",
        "BROKER_MAX_STREAMS_PER_IP",
        _positive_int,
        "open streams per client address; one more is answered 429",
    ),
    Option(
        "trusted_proxies",
        "BROKER_TRUSTED_PROXIES",
        _networks,
        "comma-separated CIDRs whose X-Forwarded-For is believed",
    ),
    Option(
        "header_timeout_seconds",
        "BROKER_HEADER_TIMEOUT_SECONDS",
        _positive_float,
        "seconds a client has to send its request line and headers",
    ),
    Option(
        "body_timeout_seconds",
        "BROKER_BODY_TIMEOUT_SECONDS",
        _positive_float,
        "seconds a client has to send a request body once its headers are in; else 408",
    ),
    Option(
        "max_header_bytes",
        "BROKER_MAX_HEADER_BYTES",
        _header_bytes,
        "largest request line plus headers; larger is answered 431",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The broker's configuration. Build it with `Settings.load`, or directly in tests."""

    database_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 5001
    max_connections: int = 10_000
    heartbeat_seconds: float = 30.0
    queue_size: int = 1_000
    retry_ms: int = 3_000
    replay_limit: int = 10_000
    cors_origins: tuple[str, ...] = ()
    log_format: str = "console"
    log_level: str = "info"
    data_dir: Path = Path(".data")
    migrate: bool = True
    shutdown_grace_seconds: float = 10.0
    auth_secret: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    admin_port: int | None = None
    admin_host: str | None = None
    max_streams_per_ip: int | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        """Checks that span settings; each message names the setting to change."""
        if self.auth_secret and "*" in self.cors_origins:
            raise ConfigError(
                "invalid BROKER_CORS_ORIGINS='*': refused while BROKER_AUTH_SECRET is set;"
                " list the exact origins allowed"
            )
        if self.admin_port is not None and self.admin_port == self.port:
            raise ConfigError(
                f"invalid BROKER_ADMIN_PORT={self.admin_port}: must differ from BROKER_PORT"
            )

    @classmethod
    def load(
        cls, environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> Settings:
        """Settings from `environ`, then from `overrides` (flag values by field name).

        Raises `ConfigError` naming the first invalid setting. `PGDATABASE_URL` is read when
        `DATABASE_URL` is unset; an empty value counts as unset. The log format defaults to
        `console` on a terminal and `json` otherwise, since a service's logs go to a collector.
        The host defaults to 127.0.0.1 with the embedded database, which is for trying pgsse
        out and has no auth, and to 0.0.0.0 with a `DATABASE_URL`.
        """
        raw: dict[str, str] = {}
        for option in OPTIONS:
            value = environ.get(option.env, "")
            if option.field == "database_url" and not value:
                value = environ.get("PGDATABASE_URL", "")
            if value:
                raw[option.field] = value
        for field, override in (overrides or {}).items():
            if override is not None:
                raw[field] = override

        values: dict[str, Any] = {}
        if "log_format" not in raw:
            values["log_format"] = "console" if sys.stderr.isatty() else "json"
        if "host" not in raw and "database_url" not in raw:
            values["host"] = "127.0.0.1"
        for option in OPTIONS:
            if option.field not in raw:
                continue
            try:
                values[option.field] = option.parse(raw[option.field])
            except ValueError as exc:
                shown = option.shown(raw[option.field])
                raise ConfigError(f"invalid {option.env}={shown}: {_reason(exc)}") from None
        return dataclasses.replace(cls(), **values)


def _reason(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith(("invalid literal", "could not convert")):
        return "not a number"
    return text
