"""`pgsse token`: a signed token from the command's flags (`web/auth.py` signs and reads it).

`--sessions` and `--robots` are comma-separated ids or `*`; each `--feed NAME` takes the
`--keys` that follows it. With `BROKER_CONFIG` set, every feed named must be one it declares.
"""

from __future__ import annotations

import argparse
import sys

from .config.feeds import MESSAGES, read
from .config.settings import Settings
from .errors import BrokerError
from .web.auth import MAX_TOKEN_SECONDS, Authenticator

__all__ = ["token"]


def token(settings: Settings, args: argparse.Namespace) -> int:
    """Print the token the flags in `args` describe, signed with the first BROKER_AUTH_SECRET."""

    def ids(text: str) -> list[str] | str:
        return "*" if text.strip() == "*" else [p.strip() for p in text.split(",") if p.strip()]

    if not 1 <= args.ttl <= MAX_TOKEN_SECONDS:
        raise BrokerError(f"--ttl must be from 1 to {MAX_TOKEN_SECONDS} seconds (a year)")
    if args.sessions is None and not args.feed:
        raise BrokerError("token: give --sessions, --feed NAME --keys K, or both")
    feeds = _feeds(settings, args.feed, [ids(keys) for keys in args.keys])
    minted = Authenticator(settings.auth_secret).mint(
        ids(args.sessions or ""),
        ids(args.robots),
        publish=args.publish,
        ttl_seconds=args.ttl,
        feeds=feeds or None,
    )
    sys.stdout.write(minted + "\n")
    return 0


def _feeds(
    settings: Settings, names: list[str], keys: list[list[str] | str]
) -> dict[str, list[str] | str]:
    """The `feeds` claim of `--feed NAME --keys K ...`, each --feed paired with the --keys
    after it. With BROKER_CONFIG set, each name must be a feed it declares (read without a
    database): a token for a misspelt feed would read nothing, and say so only when used."""
    if len(names) != len(keys):
        raise BrokerError("token: give each --feed its --keys (comma-separated, or '*')")
    declared = None if settings.config is None else [f.name for f in read(settings.config)]
    feeds: dict[str, list[str] | str] = {}
    for name, values in zip(names, keys, strict=True):
        if name == MESSAGES:
            raise BrokerError("token: --feed messages: the messages feed is scoped by --sessions")
        if declared is not None and name not in declared:
            raise BrokerError(
                f"token: --feed {name}: not a feed of BROKER_CONFIG={settings.config}"
                f" (feeds: {', '.join(declared)})"
            )
        if name in feeds:
            raise BrokerError(f"token: --feed {name} given twice: list its keys in one --keys")
        if not values:
            raise BrokerError(f"token: --feed {name}: --keys is empty (values, or '*')")
        feeds[name] = values
    return feeds
