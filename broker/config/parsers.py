"""How the text of each setting becomes its value: one parser per kind of value.

A parser takes the raw text (from the environment or a flag) and returns the value, or raises
`ValueError` with the reason, which `config.Settings.load` puts after the setting's name. A
parser of a secret never quotes the value in its reason.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "LOG_LEVELS",
    "admin_port",
    "admin_token",
    "boolean",
    "bus_url",
    "config_file",
    "database_url",
    "duration",
    "header_bytes",
    "log_format",
    "log_level",
    "networks",
    "origins",
    "port",
    "positive_float",
    "positive_int",
    "redact_url",
    "secrets",
    "stream_key",
    "text",
]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def origins(text: str) -> tuple[str, ...]:
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


def secrets(text: str) -> tuple[str, ...]:
    # Messages here never quote the value: it is a secret.
    secrets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not secrets:
        raise ValueError("must list at least one secret")
    if any(len(secret.encode()) < MIN_SECRET_BYTES for secret in secrets):
        raise ValueError(f"each comma-separated secret must be at least {MIN_SECRET_BYTES} bytes")
    return secrets


def admin_token(text: str) -> str:
    if len(text) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters")
    if not all("!" <= char <= "~" for char in text):
        raise ValueError("must be printable ASCII without spaces (it travels in a header)")
    return text


def admin_port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def header_bytes(text: str) -> int:
    value = int(text)
    if value < 1024:
        raise ValueError("must be at least 1024")
    return value


def row_bytes(text: str) -> int:
    """At least 8 KiB: a row NOTIFY carries inline (under 8000 bytes) is then never cut, so
    the listener cuts only rows it reads from the table itself."""
    value = int(text)
    if value < 8192:
        raise ValueError("must be at least 8192")
    return value


_DRIVER_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+[a-z0-9_]+)?://", re.IGNORECASE)


def database_url(text: str) -> str:
    """A libpq connection string. SQLAlchemy-style `postgresql+psycopg://` and Heroku-style
    `postgres://` URLs are accepted and normalised to `postgresql://`. (psycopg is imported
    here, not with the module: `pgsse --version` and `token` never need it.)"""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

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


_BUS_SCHEMES = ("redis://", "rediss://", "unix://")


def bus_url(text: str) -> str:
    """A Redis URL as redis-py reads it: `redis://host:port/db`, `rediss://` (TLS) or
    `unix:///path?db=N`."""
    text = text.strip()
    if not text.lower().startswith(_BUS_SCHEMES):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    parts = urlsplit(text)
    if parts.scheme.lower() != "unix" and not parts.hostname:
        raise ValueError("needs a host, as in redis://host:6379/0")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return text


def stream_key(text: str) -> str:
    """A Redis key: any bytes, but not empty nor surrounded by blanks (a likely typo)."""
    if not text or text != text.strip() or len(text) > 512:
        raise ValueError("must be 1 to 512 characters without surrounding blanks")
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


def log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def log_format(text: str) -> str:
    if text not in ("json", "console"):
        raise ValueError("must be 'json' or 'console'")
    return text


def capture(text: str) -> str:
    if text not in ("notify", "wal"):
        raise ValueError("must be 'notify' or 'wal'")
    return text


def slot_name(text: str) -> str:
    """A replication slot's name: what PostgreSQL accepts (lower case, digits, _; 63 long)."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", text):
        raise ValueError("must be 1-63 lower-case letters, digits or underscores")
    return text


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def duration(text: str) -> float:
    """Seconds, from a number of seconds or a number with a unit: `604800`, `90s`, `30m`,
    `12h`, `7d`."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError("must be a duration: seconds, or a number with s, m, h or d (as 7d)")
    value = float(match[1]) * _UNITS[match[2] or "s"]
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def config_file(text: str) -> Path:
    """The path of a readable file (read later: `feedspec.read` checks what is in it)."""
    path = Path(text)
    if not path.is_file():
        raise ValueError("no such file")
    return path


def text(text: str) -> str:
    return text
