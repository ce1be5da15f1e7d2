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
log warnings and errors only. The server and the database are imported only by the command
that needs them, so `pgsse --version` and `--help` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config.settings import OPTIONS, Option, Settings, unknown_settings
from .errors import BrokerError

if TYPE_CHECKING:
    import socket

    from .web.limits import ClientCounter, SharedStreamCounter

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
        if args.command == "serve":
            return _serve(settings)
        if args.command == "migrate":
            return _migrate(settings, args.print, args.drop_capture)
        if args.command == "token":
            return _token(settings, args)
        if args.command == "clean":
            return _clean(settings, args.yes)
        return _publish(settings, args.session, args.robot, args.text)
    except BrokerError as exc:
        return _fail(exc, 1)
    except BrokenPipeError as exc:  # `pgsse clean | head`: the reader stopped reading
        silence_closed_pipe(sys.stdout, exc)
        return 1


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


@contextmanager
def _database(settings: Settings, create: bool = False) -> Iterator[str]:
    """The database URL: the configured one, or the embedded server's (started if needed).
    Unless `create`, an embedded cluster that does not exist yet is an error, not created."""
    from .database import EmbeddedPostgres

    if settings.database_url is not None:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    if not create and not embedded.exists():
        raise BrokerError(
            f"no database: DATABASE_URL is unset and BROKER_DATA_DIR={str(embedded.requested)!r}"
            " holds no embedded PostgreSQL (`pgsse serve` creates it); set DATABASE_URL, or"
            " BROKER_DATA_DIR (--data-dir) to the data directory `pgsse serve` uses"
        )
    started = not embedded.is_running()
    embedded.start()
    try:
        yield embedded.url
    finally:
        if started:
            embedded.stop()


def _migrate(settings: Settings, print_only: bool = False, drop_capture: bool = False) -> int:
    from .database import drop_capture as drop
    from .database import migrate, migration_sql

    if drop_capture and settings.capture == "wal":
        raise BrokerError("--drop-capture leaves BROKER_CAPTURE=wal: unset BROKER_CAPTURE first")
    with _database(settings) as url:
        if print_only:
            sys.stdout.write(
                migration_sql(url, settings.config, settings.capture, settings.capture_slot)
            )
            return 0
        if drop_capture:
            dropped = drop(url, settings.capture_slot, settings.config)
            sys.stdout.write(
                f"capture slot {settings.capture_slot}: {'dropped' if dropped else 'none'}\n"
            )
            return 0
        files = migrate(url, settings.config, settings.capture, settings.capture_slot)
    sys.stdout.write("migrated: " + ", ".join(files) + "\n")
    return 0


def _clean(settings: Settings, remove: bool) -> int:
    """What the embedded PostgreSQL keeps: BROKER_DATA_DIR's cluster (wherever it really is),
    then every entry of /var/lib/pgsse, where its files go when run by root. With `remove`:
    BROKER_DATA_DIR's cluster, and every stopped one there whose BROKER_DATA_DIR no longer
    leads to it (a removed checkout, a test run that was killed). A cluster whose origin is
    not recorded (made by an older pgsse) is only shown: it may be another checkout's data."""
    from .database import EmbeddedPostgres, postmaster_alive
    from .embedded.placement import BASE, orphaned, source_file

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")

    embedded = EmbeddedPostgres(settings.data_dir)
    where = embedded.requested
    if not embedded.exists():
        say(f"{where}: no embedded PostgreSQL")
    else:
        real = where.resolve()
        running = postmaster_alive(real)
        state = "running" if running else "stopped"
        say(f"{where}: embedded PostgreSQL in {real}, {_megabytes(real)}, {state}")
        if remove and running:
            raise BrokerError(f"{where} is in use by a running PostgreSQL: stop it first")
        if remove:
            embedded.destroy()
            say(f"removed {real}" + (f" and the link {where}" if real != where else ""))
    if not BASE.is_dir():
        return 0
    for entry in sorted(path for path in BASE.iterdir() if path.is_dir()):
        size = _megabytes(entry)
        if entry.name.startswith("pginstall-"):
            say(f"{entry}: a copy of the PostgreSQL binaries, made again when needed, {size}")
            continue
        source = source_file(entry)
        origin = source.read_text() if source.exists() else "a BROKER_DATA_DIR not recorded"
        if postmaster_alive(entry):
            say(f"{entry}: embedded PostgreSQL for {origin}, {size}, running")
        elif orphaned(entry) and remove:
            shutil.rmtree(entry, ignore_errors=True)
            source.unlink(missing_ok=True)
            say(f"removed {entry}: embedded PostgreSQL for {origin}, which is gone, {size}")
        elif orphaned(entry):
            say(f"{entry}: embedded PostgreSQL for {origin}, which is gone, {size}, stopped")
        else:
            say(f"{entry}: embedded PostgreSQL for {origin}, {size}, stopped")
    return 0


def _megabytes(path: Path) -> str:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.lstat(os.path.join(directory, name)).st_size
    return f"{total / 1e6:.0f} MB"


def _serve(settings: Settings) -> int:
    import dataclasses

    import structlog

    from .database import check_database, migrate
    from .server.sockets import listen_sockets
    from .web.guard import log_exposure
    from .workers import run_workers

    log = structlog.get_logger(logger_name=__name__)
    sockets = listen_sockets(settings)  # public + admin port, if any
    try:
        with _database(settings, create=True) as url:
            settings = dataclasses.replace(settings, database_url=url)
            if settings.migrate:
                migrate(url, settings.config, settings.capture, settings.capture_slot)
            else:
                check_database(url, settings.config, settings.capture, settings.capture_slot)
            log.info(
                "listening",
                addresses=[_address(sock) for sock in sockets],
                workers=settings.workers,
            )
            log_exposure(settings)
            if settings.workers == 1:
                return _run_server(settings, sockets)
            if settings.bus_url is None:
                log.warning(
                    "workers_without_bus",
                    listening_backends=settings.workers,
                    advice="set BROKER_BUS_URL for one listening backend in all",
                )
            counter = _shared_counter(settings)
            return run_workers(
                settings.workers,
                lambda: _run_server(settings, sockets, counter),
                begin=None if counter is None else counter.use_column,
            )
    finally:
        for sock in sockets:
            sock.close()


def _shared_counter(settings: Settings) -> SharedStreamCounter | None:
    """With --workers, BROKER_MAX_STREAMS_PER_IP counted over all of them (web/limits.py): room
    for twice as many addresses as streams may be open on the port."""
    if settings.max_streams_per_ip is None:
        return None
    from .web.limits import SharedStreamCounter

    entries = 2 * settings.workers * settings.max_connections
    return SharedStreamCounter(settings.max_streams_per_ip, settings.workers, entries)


def _run_server(
    settings: Settings, sockets: list[socket.socket], counter: ClientCounter | None = None
) -> int:
    """One broker process serving `sockets` until SIGTERM/SIGINT; its exit status."""
    import asyncio
    import signal
    from types import FrameType

    import structlog
    import uvicorn

    from .server.protocol import server_options
    from .service import Broker
    from .web.app import create_app

    log = structlog.get_logger(logger_name=__name__)

    class _Server(uvicorn.Server):
        """uvicorn, plus: on the first SIGTERM/SIGINT, every stream is sent `error` and
        closed, so that clients reconnect to another instance while this one drains. What
        this relies on in `uvicorn.Server` is listed in `server/hooks.py`."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            broker: Broker | None = getattr(app.state, "broker", None)  # set by the lifespan
            if first and broker is not None:
                # Streams first: nothing, not even a failing log line, may come before them.
                asyncio.get_running_loop().call_soon_threadsafe(broker.close_streams)
                log.info("shutdown_requested", signal=signal.Signals(sig).name)

    app = create_app(settings, counter)
    config = uvicorn.Config(
        app,
        **server_options(settings),  # request limits; client address behind proxies
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
        server_header=False,
    )
    server = _Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; ignoring it then lets a
    # graceful stop exit 0 as the contract says.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _tune_gc()
    server.run(sockets=sockets)
    log.info("stopped")
    return 0 if server.started else 1


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tune_gc() -> None:
    """Fewer, cheaper collections: the objects of start-up (modules, app, settings) live for
    the whole run, so freeze them out of every collection; and let the young generation grow
    before it is collected, since each delivery allocates a few short-lived objects
    (py-spy under `make bench` fanout showed 6-9% of the broker's CPU in the collector)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _token(settings: Settings, args: argparse.Namespace) -> int:
    def ids(text: str) -> list[str] | str:
        return "*" if text.strip() == "*" else [p.strip() for p in text.split(",") if p.strip()]

    from .web.auth import MAX_TOKEN_SECONDS, Authenticator

    if not 1 <= args.ttl <= MAX_TOKEN_SECONDS:
        raise BrokerError(f"--ttl must be from 1 to {MAX_TOKEN_SECONDS} seconds (a year)")
    if args.sessions is None and not args.feed:
        raise BrokerError("token: give --sessions, --feed NAME --keys K, or both")
    feeds = _token_feeds(settings, args.feed, [ids(keys) for keys in args.keys])
    token = Authenticator(settings.auth_secret).mint(
        ids(args.sessions or ""),
        ids(args.robots),
        publish=args.publish,
        ttl_seconds=args.ttl,
        feeds=feeds or None,
    )
    sys.stdout.write(token + "\n")
    return 0


def _token_feeds(
    settings: Settings, names: list[str], keys: list[list[str] | str]
) -> dict[str, list[str] | str]:
    """The `feeds` claim of `--feed NAME --keys K ...`, each --feed paired with the --keys
    after it. With BROKER_CONFIG set, each name must be a feed it declares (read without a
    database): a token for a misspelt feed would read nothing, and say so only when used."""
    from .config.feeds import MESSAGES, read

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


def _publish(settings: Settings, session: str, robot: str | None, text: str) -> int:
    import asyncio

    import orjson

    from .store import Store

    async def insert(url: str) -> None:
        async with Store.open(url) as store:
            message = await store.insert(session, text, robot)
        sys.stdout.write(orjson.dumps(message.as_json()).decode() + "\n")

    with _database(settings) as url:
        asyncio.run(insert(url))
    return 0
