"""Settings: read once from the environment (and `broker serve` flags), validated at once.

Every setting is one field of `Settings`, declared with `setting(...)`; its environment
variable, command-line flag, default and parser (`parsers.py`) all come from that one
declaration (`OPTIONS` is derived from the fields by `options.py`), so they can never drift
apart. An invalid value raises `ConfigError` with a one-line message naming the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import parsers
from .options import Option, declared_options, parse_raw, setting, unknown_variables
from .parsers import LOG_LEVELS, redact_url

__all__ = [
    "LOG_LEVELS",
    "OPTIONS",
    "Option",
    "Settings",
    "redact_url",
    "setting",
    "unknown_settings",
]


@dataclass(frozen=True, slots=True)
class Settings:
    """The broker's configuration. Build it with `Settings.load`, or directly in tests.

    Each field is one `setting`: `OPTIONS`, the `serve` flags, the defaults `--help` shows and
    the parsing of each value all come from it."""

    database_url: str | None = setting(
        None,
        "DATABASE_URL",
        parsers.database_url,
        "PostgreSQL URL (postgresql://, postgres:// or postgresql+psycopg://)",
        redact=redact_url,
        shown_default="unset: an embedded PostgreSQL under BROKER_DATA_DIR",
        fallback_env="PGDATABASE_URL",
    )
    host: str = setting(
        "0.0.0.0",
        "BROKER_HOST",
        parsers.text,
        "address to listen on",
        shown_default="127.0.0.1 with the embedded PostgreSQL, else 0.0.0.0",
    )
    port: int = setting(5001, "BROKER_PORT", parsers.port, "port to listen on")
    workers: int = setting(
        1,
        "BROKER_WORKERS",
        parsers.positive_int,
        "broker processes serving the port; each LISTENs unless BROKER_BUS_URL is set",
    )
    max_connections: int = setting(
        10_000,
        "BROKER_MAX_CONNECTIONS",
        parsers.positive_int,
        "open streams at most; one more is answered 503",
    )
    heartbeat_seconds: float = setting(
        30.0, "BROKER_HEARTBEAT_SECONDS", parsers.positive_float, "seconds between heartbeat events"
    )
    queue_size: int = setting(
        1_000,
        "BROKER_QUEUE_SIZE",
        parsers.positive_int,
        "events queued per subscriber before it is closed as a slow consumer",
    )
    queue_bytes: int = setting(
        4 * 1024 * 1024,
        "BROKER_QUEUE_BYTES",
        parsers.positive_int,
        "bytes of events queued per subscriber before it is closed as a slow consumer"
        " (an empty queue takes one event whatever its size)",
    )
    max_row_bytes: int = setting(
        1024 * 1024,
        "BROKER_MAX_ROW_BYTES",
        parsers.row_bytes,
        "content bytes of a row sent whole; a larger row is sent cut, with truncated: true",
    )
    retry_ms: int = setting(
        3_000, "BROKER_RETRY_MS", parsers.positive_int, "the SSE retry: hint, milliseconds"
    )
    replay_limit: int = setting(
        10_000, "BROKER_REPLAY_LIMIT", parsers.positive_int, "most rows replayed on one connection"
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        "BROKER_CORS_ORIGINS",
        parsers.origins,
        "comma-separated origins allowed by CORS, '*' for any",
    )
    log_format: str = setting(
        "console",
        "BROKER_LOG_FORMAT",
        parsers.log_format,
        "json or console",
        shown_default="console on a terminal, else json",
    )
    log_level: str = setting(
        "info",
        "BROKER_LOG_LEVEL",
        parsers.log_level,
        "debug, info, warning or error; streams opening and closing are logged at debug",
    )
    data_dir: Path = setting(  # noqa: RUF009 -- `setting` is a dataclasses.field
        Path(".data"), "BROKER_DATA_DIR", Path, "where the embedded PostgreSQL keeps its data"
    )
    migrate: bool = setting(True, "BROKER_MIGRATE", parsers.boolean, "apply sql/ at start-up")
    config: Path | None = setting(  # noqa: RUF009 -- `setting` is a dataclasses.field
        None,
        "BROKER_CONFIG",
        parsers.config_file,
        "TOML file declaring feeds (docs/feeds.md)",
        shown_default="unset: the messages feed, inserts only",
    )
    retention: float = setting(  # seconds
        7 * 86400.0,
        "BROKER_RETENTION",
        parsers.duration,
        "how long changes are kept for resume: seconds, or with a unit (90s, 30m, 12h, 7d)",
        shown_default="7d",
    )
    shutdown_grace_seconds: float = setting(
        10.0,
        "BROKER_SHUTDOWN_GRACE_SECONDS",
        parsers.positive_float,
        "seconds given to streams to close on SIGTERM",
    )
    auth_secret: tuple[str, ...] = setting(
        (),
        "BROKER_AUTH_SECRET",
        parsers.secrets,
        "comma-separated HS256 secrets: the first signs, all verify; unset: no auth",
        secret=True,
    )
    admin_token: str | None = setting(
        None,
        "BROKER_ADMIN_TOKEN",
        parsers.admin_token,
        "bearer token required by /api/sse/stats and /metrics",
        secret=True,
    )
    admin_port: int | None = setting(
        None,
        "BROKER_ADMIN_PORT",
        parsers.admin_port,
        "separate port serving /api/sse/stats and /metrics (404 on the public port)",
    )
    admin_host: str | None = setting(
        None,
        "BROKER_ADMIN_HOST",
        parsers.text,
        "address of the admin port",
        shown_default="BROKER_HOST",
    )
    max_streams_per_ip: int | None = setting(
        None,
        "BROKER_MAX_STREAMS_PER_IP",
        parsers.positive_int,
        "open streams per client address; one more is answered 429",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        (),
        "BROKER_TRUSTED_PROXIES",
        parsers.networks,
        "comma-separated CIDRs whose X-Forwarded-For is believed",
    )
    header_timeout_seconds: float = setting(
        10.0,
        "BROKER_HEADER_TIMEOUT_SECONDS",
        parsers.positive_float,
        "seconds a client has to send its request line and headers",
    )
    body_timeout_seconds: float = setting(
        10.0,
        "BROKER_BODY_TIMEOUT_SECONDS",
        parsers.positive_float,
        "seconds a client has to send a request body once its headers are in; else 408",
    )
    max_header_bytes: int = setting(
        16 * 1024,
        "BROKER_MAX_HEADER_BYTES",
        parsers.header_bytes,
        "largest request line plus headers; larger is answered 431",
    )

    bus_url: str | None = setting(
        None,
        "BROKER_BUS_URL",
        parsers.bus_url,
        "Redis URL of the bus: one relay LISTENs, every broker reads one shared order"
        " (docs/deployment.md)",
        redact=redact_url,
        shown_default="unset: every process LISTENs itself",
    )
    bus_stream: str = setting(
        "pgsse:messages", "BROKER_BUS_STREAM", parsers.stream_key, "the bus's Redis stream key"
    )
    bus_max_bytes: int = setting(
        64 * 1024 * 1024,
        "BROKER_BUS_MAX_BYTES",
        parsers.positive_int,
        "bytes of rows the bus's stream keeps at most (it keeps 50,000 rows at most too);"
        " a broker that falls further behind ends its streams so clients resume",
    )
    capture: str = setting(
        "notify",
        "BROKER_CAPTURE",
        parsers.capture,
        "how rows reach the broker: notify (triggers NOTIFY) or wal (a logical replication"
        " slot, no commit lock; needs wal_level=logical)",
    )
    capture_slot: str = setting(
        "pgsse",
        "BROKER_CAPTURE_SLOT",
        parsers.slot_name,
        "the replication slot of BROKER_CAPTURE=wal (one per database of a cluster)",
    )

    def __post_init__(self) -> None:
        """Checks that span settings; each message names the setting to change."""
        if self.auth_secret and "*" in self.cors_origins:
            raise ConfigError(
                "invalid BROKER_CORS_ORIGINS='*': refused while BROKER_AUTH_SECRET is set;"
                " list the exact origins allowed"
            )
        if self.capture == "wal" and self.workers > 1 and self.bus_url is None:
            raise ConfigError(
                f"invalid BROKER_WORKERS={self.workers} with BROKER_CAPTURE=wal: one process"
                " reads the capture slot and the others would never be ready; set"
                " BROKER_BUS_URL (the relay reads it for all), or BROKER_WORKERS=1"
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
        raw = {option.field: value for option in OPTIONS if (value := option.read(environ))}
        raw.update(
            {field: value for field, value in (overrides or {}).items() if value is not None}
        )

        values: dict[str, Any] = {}
        if "log_format" not in raw:
            values["log_format"] = "console" if sys.stderr.isatty() else "json"
        if "host" not in raw and "database_url" not in raw:
            values["host"] = "127.0.0.1"
        values.update(parse_raw(OPTIONS, raw))
        return dataclasses.replace(cls(), **values)


OPTIONS: tuple[Option, ...] = declared_options(Settings)


def unknown_settings(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The `BROKER_*` variables of `environ` that are no setting, each with the closest
    setting's variable (or None)."""
    return unknown_variables(OPTIONS, environ)
