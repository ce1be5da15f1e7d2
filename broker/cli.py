"""`pgsse serve | migrate | publish | token | clean`: the command line (`broker` is the same one).

Every `serve` flag is a `Settings` field (`config/settings.OPTIONS`); flags win over the
environment.
With no database URL, `serve` uses the embedded PostgreSQL under `--data-dir`, creating and
starting it if needed and stopping it at exit only if it started it. The other commands use
that cluster only if it exists (starting it if stopped): run in the wrong directory they would
otherwise create a second, empty cluster and fail on its missing table; they say instead in
one line where they looked and what to set. `migrate` included: `serve` migrates the cluster
it creates, so a `migrate` with nothing to migrate is that same mistake. A failure to start is
one line on stderr naming the setting to change, found before the embedded database starts
where it can be (the listening address and port are bound first).

Commands print their result and their errors, nothing else: the commands other than `serve`
log warnings and errors only. Their bodies live in `serve.py`, `commands.py` (`migrate`,
`publish`, `clean`) and `mint.py` (`token`), each imported only by the command that needs
it, with the server and the database, so `pgsse --version` and `--help` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config.settings import OPTIONS, Option, Settings, unknown_settings
from .errors import BrokerError

__all__ = ["main"]

QUIET_LEVEL = "warning"  # what the commands other than `serve` log


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        option.field: getattr(args, option.field, None)
        for option in OPTIONS
        if getattr(args, option.field, None) is not None
    }
    try:
        settings = Settings.load(os.environ, overrides)
    except BrokerError as exc:
        return _fail(exc, 2)
    import structlog

    from .log import configure, silence_closed_pipe

    quiet = args.command != "serve"
    configure(settings.log_format, QUIET_LEVEL if quiet else settings.log_level)
    for name, closest in unknown_settings(os.environ):
        structlog.get_logger(logger_name=__name__).warning(
            "unknown_setting", variable=name, closest=closest, ignored=True
        )
    try:
        return _run(args, settings)
    except BrokerError as exc:
        return _fail(exc, 1)
    except BrokenPipeError as exc:  # `pgsse clean | head`: the reader stopped reading
        silence_closed_pipe(sys.stdout, exc)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """The command's body, from the module that holds it, imported only now."""
    if args.command == "serve":
        from .serve import serve

        return serve(settings)
    if args.command == "token":
        from .mint import token

        return token(settings, args)
    from . import commands

    if args.command == "migrate":
        return commands.migrate(settings, args.print, args.drop_capture)
    if args.command == "clean":
        return commands.clean(settings, args.yes)
    return commands.publish(settings, args.session, args.robot, args.text)


def _fail(exc: BrokerError, status: int) -> int:
    print("pgsse: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, always
    return status


def _parser() -> argparse.ArgumentParser:
    called = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog=called if called in ("pgsse", "broker") else "pgsse",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the SSE API")
    for option in OPTIONS:
        _add_option(serve, option)
    database_options = [o for o in OPTIONS if o.field in ("database_url", "data_dir")]
    for name, text in (
        ("migrate", "apply sql/ and the declared feeds' capture, idempotently"),
        ("publish", "insert one message, for trying it out"),
        (
            "clean",
            "show what the embedded PostgreSQL keeps on disk; --yes removes BROKER_DATA_DIR's",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        for option in database_options:
            _add_option(sub, option)
    commands.choices["clean"].add_argument(
        "--yes",
        action="store_true",
        help="remove BROKER_DATA_DIR's embedded PostgreSQL, and stopped ones whose"
        " BROKER_DATA_DIR is gone (default: only show)",
    )
    _add_option(commands.choices["migrate"], next(o for o in OPTIONS if o.field == "config"))
    commands.choices["migrate"].add_argument(
        "--print",
        action="store_true",
        help="print the SQL migrate would run, and run nothing (default: run it)",
    )
    commands.choices["migrate"].add_argument(
        "--drop-capture",
        action="store_true",
        help="leave BROKER_CAPTURE=wal: NOTIFY trigger back, replication slot"
        " BROKER_CAPTURE_SLOT and its publication dropped (a slot nobody reads keeps WAL;"
        " default: migrate)",
    )
    publish = commands.choices["publish"]
    publish.add_argument("--session", required=True, help="sessionId of the message (required)")
    publish.add_argument("--robot", help="robotId of the message (default: none)")
    publish.add_argument("text", help="the message content")
    token = commands.add_parser(
        "token", help="print a signed token (signed with the first BROKER_AUTH_SECRET)"
    )
    token.add_argument(
        "--sessions",
        help="comma-separated sessionIds, or '*' (default: none; give --sessions, --feed or both)",
    )
    token.add_argument(
        "--robots", default="*", help="comma-separated robotIds, or '*' (default: '*')"
    )
    token.add_argument(
        "--publish", action="store_true", help="allow POST /api/messages (default: not allowed)"
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until expiry (default: 3600)")
    _add_option(token, next(o for o in OPTIONS if o.field == "config"))  # checks --feed names
    token.add_argument(
        "--feed",
        action="append",
        default=[],
        metavar="NAME",
        help="a feed the token may read, each followed by its --keys; repeatable (default: none)",
    )
    token.add_argument(
        "--keys",
        action="append",
        default=[],
        help="the --feed's key values, comma-separated, or '*' for every key and the global"
        " stream (default: none; required with each --feed)",
    )
    return parser


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    text = f"{option.help} (env {option.env}; default: {option.default_text()})"
    parser.add_argument(
        option.flag, dest=option.field, metavar=option.env, help=text.replace("%", "%%")
    )
