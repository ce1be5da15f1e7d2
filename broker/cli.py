"""`pgsse serve | migrate | publish | token`: the command line (`broker` is the same command).

Every `serve` flag is a `Settings` field (`config.OPTIONS`); flags win over the environment.
With no database URL, each command uses the embedded PostgreSQL under `--data-dir`, starting
it if needed and stopping it at exit only if it started it. A failure to start is one line on
stderr naming the setting to change, found before the embedded database starts where it can be
(the listening address and port are bound first).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import orjson
import structlog
import uvicorn
from starlette.applications import Starlette

from . import __version__
from .app import create_app
from .auth import Authenticator
from .config import OPTIONS, Option, Settings
from .database import EmbeddedPostgres, check_database, migrate, migration_sql
from .errors import BrokerError
from .guard import log_exposure
from .log import configure
from .service import Broker
from .sockets import listen_sockets
from .store import Store
from .transport import server_options
from .workers import run_workers

__all__ = ["main"]

log = structlog.get_logger(logger_name="broker.cli")


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
    configure(settings.log_format, settings.log_level)
    try:
        if args.command == "serve":
            return _serve(settings)
        if args.command == "migrate":
            with _database(settings) as url:
                if args.print:
                    sys.stdout.write(migration_sql(url, settings.config))
                else:
                    migrate(url, settings.config)
            return 0
        if args.command == "token":
            return _token(settings, args)
        return _publish(settings, args.session, args.robot, args.text)
    except BrokerError as exc:
        return _fail(exc, 1)


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
    ):
        sub = commands.add_parser(name, help=text, description=text)
        for option in database_options:
            _add_option(sub, option)
    _add_option(commands.choices["migrate"], next(o for o in OPTIONS if o.field == "config"))
    commands.choices["migrate"].add_argument(
        "--print",
        action="store_true",
        help="print the SQL migrate would run, and run nothing (default: run it)",
    )
    publish = commands.choices["publish"]
    publish.add_argument("--session", required=True, help="sessionId of the message (required)")
    publish.add_argument("--robot", help="robotId of the message (default: none)")
    publish.add_argument("text", help="the message content")
    token = commands.add_parser(
        "token", help="print a signed token (signed with the first BROKER_AUTH_SECRET)"
    )
    token.add_argument(
        "--sessions", required=True, help="comma-separated sessionIds, or '*' (required)"
    )
    token.add_argument(
        "--robots", default="*", help="comma-separated robotIds, or '*' (default: '*')"
    )
    token.add_argument(
        "--publish", action="store_true", help="allow POST /api/messages (default: not allowed)"
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until expiry (default: 3600)")
    return parser


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    text = f"{option.help} (env {option.env}; default: {option.default_text()})"
    parser.add_argument(
        option.flag, dest=option.field, metavar=option.env, help=text.replace("%", "%%")
    )


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The database URL: the configured one, or the embedded server's (started if needed)."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    started = not embedded.is_running()
    embedded.start()
    try:
        yield embedded.url
    finally:
        if started:
            embedded.stop()


class _Server(uvicorn.Server):
    """uvicorn, plus: on the first SIGTERM/SIGINT, every stream is sent `error` and closed,
    so that clients reconnect to another instance while this one drains."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        broker: Broker | None = getattr(self.app.state, "broker", None)  # set by the lifespan
        if first and broker is not None:
            log.info("shutdown_requested", signal=signal.Signals(sig).name)
            asyncio.get_running_loop().call_soon_threadsafe(broker.close_streams)


def _serve(settings: Settings) -> int:
    sockets = listen_sockets(settings)  # public + admin port, if any
    try:
        with _database(settings) as url:
            settings = dataclasses.replace(settings, database_url=url)
            if settings.migrate:
                migrate(url, settings.config)
            else:
                check_database(url, settings.config)
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
            return run_workers(settings.workers, lambda: _run_server(settings, sockets))
    finally:
        for sock in sockets:
            sock.close()


def _run_server(settings: Settings, sockets: list[socket.socket]) -> int:
    """One broker process serving `sockets` until SIGTERM/SIGINT; its exit status."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        **server_options(settings),  # request limits; client address behind proxies
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
        server_header=False,
    )
    server = _Server(config, app)
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
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _token(settings: Settings, args: argparse.Namespace) -> int:
    def ids(text: str) -> list[str] | str:
        return "*" if text.strip() == "*" else [p.strip() for p in text.split(",") if p.strip()]

    if args.ttl < 1:
        raise BrokerError("--ttl must be at least 1 second")
    token = Authenticator(settings.auth_secret).mint(
        ids(args.sessions), ids(args.robots), publish=args.publish, ttl_seconds=args.ttl
    )
    sys.stdout.write(token + "\n")
    return 0


def _publish(settings: Settings, session: str, robot: str | None, text: str) -> int:
    async def insert(url: str) -> None:
        async with Store.open(url) as store:
            message = await store.insert(session, text, robot)
        sys.stdout.write(orjson.dumps(message.as_json()).decode() + "\n")

    with _database(settings) as url:
        asyncio.run(insert(url))
    return 0
