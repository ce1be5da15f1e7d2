"""PostgreSQL itself: the embedded server for `make run` and tests, and migrations.

The embedded server runs the binaries that the pgserver package ships (so nothing but PyPI is
needed), listening on a Unix socket inside its data directory only. Run by root, it runs them
as the unprivileged user `pgserver`, as PostgreSQL refuses to run as root; `embedded/placement.py`
decides where its files live so that user can reach them.

`migrate` applies `sql/*.sql` in name order, then the capture of the declared feeds
(`capture.py`), under a transaction-scoped advisory lock, so instances that start together
apply them one after the other; every statement is idempotent.

`database_url` is which PostgreSQL a command uses: `DATABASE_URL`, or the embedded server,
started if stopped; only `serve` creates a cluster (`cli.py` says why).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import structlog
from psycopg import sql

from . import slots
from .config import feeds as feedspec
from .config.settings import Settings, redact_url
from .embedded.placement import Placement, absolute, locate, source_file
from .errors import BrokerError
from .feeds.capture import capture_sql, captured_events, trigger_name

__all__ = [
    "EmbeddedPostgres",
    "check_database",
    "connect",
    "database_url",
    "drop_capture",
    "migrate",
    "migration_sql",
    "postmaster_alive",
    "sql_files",
]

MIGRATION_LOCK = 0x70677373  # "pgss": the advisory lock key migrations serialise on
# BROKER_CAPTURE=wal reads a logical replication slot (feeds/wal.py), so the embedded server
# always runs with logical WAL. Given with `pg_ctl -o` at every start, not written into the
# cluster's configuration, so a cluster made by an older pgsse has it from its next start.
# Its cost without a slot: a few bytes more WAL per transaction.
LOGICAL_DECODING = "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep room for "/.s.PGSQL.5432"

log = structlog.get_logger(logger_name=__name__)


def sql_dir() -> Path:
    """`sql/` of the checkout (editable install) or the copy inside the wheel."""
    for candidate in (Path(__file__).parent / "sql", Path(__file__).parent.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise BrokerError("no sql/ directory found beside the broker package")


def sql_files() -> list[Path]:
    return sorted(sql_dir().glob("*.sql"))


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection to `url`; a failure to connect raises `BrokerError` in one line naming
    the URL (password hidden) and what to check."""
    try:
        return psycopg.connect(url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        raise BrokerError(
            f"cannot connect to DATABASE_URL={redact_url(url)}: {reason}; check the URL and"
            " that PostgreSQL is running and reachable from here"
        ) from None


def migrate(
    url: str, config: Path | None = None, capture: str = "notify", slot: str = "pgsse"
) -> list[str]:
    """Apply every file of `sql/`, then the capture of the feeds `config` declares (None: the
    messages feed, inserts only), in one transaction; returns the file names applied.

    A mistake in `config` raises `ConfigError` (one line naming feed and field) before anything
    is installed: the file is read before connecting, and checked against the catalog inside
    the transaction, which then rolls back.

    With `capture="wal"` the publication and the replication slot `slot` are made next, then
    the messages table joins the publication and loses its NOTIFY trigger (`slots.py`). With
    `notify` the files put the NOTIFY trigger back and the table leaves the publication; a
    capture slot left from the WAL mode is only warned about (it keeps WAL: `pgsse migrate
    --drop-capture`)."""
    declared = feedspec.read(config)
    with connect(url) as conn, _translated():
        conn.autocommit = True  # each `transaction()` below is its own (slots.prepare needs it)
        if capture == "wal":  # the slot first, then the triggers (slots.py says why)
            slots.prepare(conn, slot, MIGRATION_LOCK)
        # One transaction: `sql/` puts the NOTIFY trigger back, and with wal the same
        # transaction swaps it for the logical message again, so a broker reading the slot
        # while another instance migrates never misses a row to a NOTIFY no one hears.
        with conn.transaction():
            feeds = _apply_sql(conn, declared)
            conn.execute(_capture_swap(capture).encode())
            conn.execute(capture_sql(feeds, capture, key_table=_key_table(conn)).encode())
        if (
            capture != "wal"
            and conn.execute(
                "SELECT 1 FROM pg_replication_slots"
                " WHERE slot_name = %s AND database = current_database()",
                (slot,),
            ).fetchone()
        ):
            log.warning("capture_slot_unused", slot=slot, drop="pgsse migrate --drop-capture")
    names = [path.name for path in sql_files()]
    log.info("migrated", files=names, feeds=[feed.name for feed in feeds], capture=capture)
    return names


def drop_capture(url: str, slot: str = "pgsse", config: Path | None = None) -> bool:
    """Put the NOTIFY trigger back (`migrate`), then drop the WAL capture's slot and
    publication; True when there was a slot. A forgotten slot keeps every WAL segment written
    after its position, so this is the way out of `BROKER_CAPTURE=wal`."""
    migrate(url, config, "notify", slot="")
    with connect(url) as conn:
        conn.autocommit = True
        return slots.drop(conn, slot)


def migration_sql(
    url: str, config: Path | None = None, capture: str = "notify", slot: str = "pgsse"
) -> str:
    """What `migrate` would run, as one script for psql (`pgsse migrate --print`).

    The feeds are checked against the catalog as `migrate` would see it: `sql/` is applied in
    a transaction that is rolled back, so nothing is changed. With `capture="wal"` the
    publication and the slot come first, each statement of its own (a slot cannot be made in
    a transaction that wrote), as `slots.prepare` makes them."""
    declared = feedspec.read(config)
    with connect(url) as conn, _translated(), conn.transaction(force_rollback=True):
        feeds = _apply_sql(conn, declared)
        key_table = _key_table(conn)
        swap = _capture_swap(capture)
    parts: list[str] = []
    if capture == "wal":
        parts += [
            "-- BROKER_CAPTURE=wal: the publication and the slot, before the transaction",
            f"CREATE PUBLICATION {slots.PUBLICATION};  -- unless it exists",
            sql.SQL("SELECT pg_create_logical_replication_slot({}, {});  -- unless it exists")
            .format(sql.Literal(slot), sql.Literal(slots.PLUGIN))
            .as_string(None),
        ]
    parts += ["BEGIN;", f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK});"]
    for path in sql_files():
        parts += [f"-- sql/{path.name}", path.read_text(encoding="utf-8").rstrip()]
    parts += [f"-- the messages table's capture (BROKER_CAPTURE={capture})", swap.rstrip()]
    script = capture_sql(feeds, capture, key_table=key_table).rstrip()
    parts += ["-- capture of the declared feeds", script, "COMMIT;"]
    return "\n".join(parts) + "\n"


def _capture_swap(capture: str) -> str:
    """After `sql/` in the migration's transaction: the messages table's capture of mode
    `capture` (`slots.py`)."""
    if capture == "wal":
        return slots.wal_capture_sql()
    return slots.notify_capture_sql()


def _apply_sql(
    conn: psycopg.Connection[Any], declared: tuple[feedspec.Declared, ...]
) -> tuple[feedspec.Feed, ...]:
    """In `conn`'s transaction: take the migration lock, apply `sql/`, and check `declared`
    against the catalog that results."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    for path in sql_files():
        conn.execute(path.read_text(encoding="utf-8").encode())
    return feedspec.resolve(conn, declared)


def _key_table(conn: psycopg.Connection[Any]) -> sql.Identifier | None:
    """The signing key's table (`pgsse_key`, made by `sql/` where notifications are signed),
    qualified, or None where there is none."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('pgsse_key')"
    ).fetchone()
    return None if row is None else sql.Identifier(str(row[0]), "pgsse_key")


@contextmanager
def _translated() -> Iterator[None]:
    """A psycopg error of a migration as `BrokerError`, in one line."""
    try:
        yield
    except psycopg.Error as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise BrokerError(f"migration failed: {reason}") from None


def check_database(
    url: str, config: Path | None = None, capture: str = "notify", slot: str = "pgsse"
) -> None:
    """What serving needs, checked once at start-up when migrations are off: the database
    answers, holds table `messages` and the signing key (`pgsse_key`, from `sql/`), and the
    feeds of `config` are valid and installed; with `capture="wal"`, the slot exists and the
    publication holds `messages` (else no row would ever reach the broker)."""
    declared = feedspec.read(config)
    with connect(url) as conn:
        if capture == "wal":
            _check_wal(conn, slot)
        found = conn.execute(
            "SELECT to_regclass('messages') IS NOT NULL AND to_regclass('pgsse_key') IS NOT NULL"
        ).fetchone()
        if not found or not found[0]:
            raise BrokerError(
                f"invalid BROKER_MIGRATE=false: DATABASE_URL={redact_url(url)} has no table"
                " messages or pgsse_key; run `pgsse migrate` once, or unset BROKER_MIGRATE"
            )
        captured = [feed for feed in feedspec.resolve(conn, declared) if captured_events(feed)]
        # Only when a feed is captured: a role that serves the messages feed alone may have no
        # right to look into schema pgsse.
        installed = (
            {
                str(name)
                for (name,) in conn.execute(
                    "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
                    " AND tgfoid = to_regprocedure('pgsse.capture()')"
                ).fetchall()
            }
            if captured
            else set()
        )
    for feed in captured:
        if trigger_name(feed) not in installed:
            raise BrokerError(
                f"invalid BROKER_MIGRATE=false: feed {feed.name} is not installed;"
                " run `pgsse migrate --config` with this file, or unset BROKER_MIGRATE"
            )


def _check_wal(conn: psycopg.Connection[Any], slot: str) -> None:
    """The slot exists, and the publication holds `messages` (else no row reaches it)."""
    found = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_replication_slots"
        "  WHERE slot_name = %s AND database = current_database()),"
        " EXISTS (SELECT FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid"
        "  WHERE p.pubname = %s AND p.pubinsert AND r.prrelid = to_regclass(%s))",
        (slot, slots.PUBLICATION, slots.MESSAGES_TABLE),
    ).fetchone()
    if not found or not found[0] or not found[1]:
        raise BrokerError(
            f"invalid BROKER_MIGRATE=false with BROKER_CAPTURE=wal: the database has no"
            f" capture slot {slot!r} or its publication lacks table messages; run `pgsse"
            " migrate` with BROKER_CAPTURE=wal once, or unset BROKER_MIGRATE"
        )


def postmaster_alive(data_dir: Path) -> bool:
    """Whether the postmaster of `data_dir`'s `postmaster.pid` is alive (what `pg_ctl status`
    checks, without needing the binaries or the server's user)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and another user's
    try:  # a pid file left by a crash may name a pid reused since
        return Path(f"/proc/{pid}/comm").read_text().startswith("postgres")
    except OSError:
        return True


class EmbeddedPostgres:
    """A PostgreSQL cluster for BROKER_DATA_DIR `data_dir`, created on first start.
    Blocking calls. `embedded/placement.py` says where its files really are."""

    def __init__(self, data_dir: Path) -> None:
        self.requested = absolute(data_dir)
        self._placement: Placement | None = None

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            self._placement = locate(self.requested)
        return self._placement

    @property
    def data_dir(self) -> Path:
        """Where the cluster really is (BROKER_DATA_DIR, or where it points)."""
        return self.placement.data_dir

    @property
    def socket_dir(self) -> Path:
        """Where the server's socket is: its data directory when that path is short enough,
        else the private directory the running server names in its `postmaster.pid`.

        A predictable name under /tmp could be made first by another local user, who would
        then own the socket of a `postgres` superuser trusting every local connection; so
        `start` makes an unpredictable one (mkdtemp: ours, mode 700), and a directory named
        by the pid file is used only if it still is a directory of the server's user that
        nobody else may enter."""
        if len(str(self.data_dir)) <= SOCKET_PATH_MAX:
            return self.data_dir
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().split("\n")
        except OSError:
            message = f"the embedded PostgreSQL of {self.data_dir} is not running"
            raise BrokerError(message) from None
        recorded = Path(lines[4]) if len(lines) > 4 and lines[4].startswith("/") else None
        if recorded is None or not self._is_private(recorded):
            raise BrokerError(
                f"the socket directory {recorded} of the embedded PostgreSQL of {self.data_dir}"
                " is not a mode-700 directory of the server's user; stop that server"
            )
        return recorded

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"

    def exists(self) -> bool:
        """Whether a cluster was created for BROKER_DATA_DIR (in it, or where its link
        points); looks only, creating nothing (`placement` may create the server's user)."""
        return (self.requested / "PG_VERSION").exists()

    def is_running(self) -> bool:
        return postmaster_alive(self.data_dir)

    def start(self) -> None:
        """Create the cluster if needed and start it; no-op if it is running."""
        placement = self.placement
        placement.prepare()
        if placement.relocated:
            log.info(
                "embedded_postgres_data",
                data_dir=str(placement.data_dir),
                broker_data_dir=str(placement.requested),
                linked=placement.requested.is_symlink(),
            )
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "-U",
                    "postgres",
                ]
            )
        if self.is_running():
            return
        socket_dir = self._make_socket_dir()
        options = f"-h '' -k {socket_dir} -c max_connections=200 -c fsync=on {LOGICAL_DECODING}"
        try:
            self._run(
                [
                    "pg_ctl",
                    "start",
                    "-w",
                    "-t",
                    "30",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.data_dir / "log"),
                    "-o",
                    options,
                ]
            )
        except BrokerError:
            if socket_dir != self.data_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        log.info("embedded_postgres_started", data_dir=str(self.data_dir))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` ends sessions, `immediate` is a crash) and remove the
        socket directory `start` made; no-op if stopped."""
        if self.is_running():
            self.placement.prepare()  # the binaries, if another process started it
            try:
                socket_dir: Path | None = self.socket_dir
            except BrokerError:
                socket_dir = None  # not one of ours: leave it alone
            self._run(["pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data_dir)])
            if socket_dir is not None and socket_dir != self.data_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            log.info("embedded_postgres_stopped", data_dir=str(self.data_dir), mode=mode)

    def destroy(self) -> None:
        """Stop the server and delete the cluster, wherever it is, and the link to it."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        source_file(self.data_dir).unlink(missing_ok=True)
        if self.requested.is_symlink():
            self.requested.unlink()

    def _make_socket_dir(self) -> Path:
        """The directory for the socket: the data directory, or a fresh private one."""
        if len(str(self.data_dir)) <= SOCKET_PATH_MAX:
            return self.data_dir
        # /tmp, not $TMPDIR: the path must stay short (sun_path is 108 bytes)
        made = Path(tempfile.mkdtemp(prefix=f"pgsse-{os.geteuid()}-", dir="/tmp"))
        user = self.placement.user
        if user is not None:
            os.chown(made, user.uid, user.gid)
        return made

    def _is_private(self, path: Path) -> bool:
        """`path` is a directory (not a link) of the server's user, mode 700 or stricter."""
        user = self.placement.user
        try:
            info = path.lstat()
        except OSError:
            return False
        owner = os.geteuid() if user is None else user.uid
        return stat.S_ISDIR(info.st_mode) and info.st_uid == owner and not info.st_mode & 0o077

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        placement = self.placement
        user = placement.user
        command = [str(placement.bin_dir / argv[0]), *argv[1:]]
        result = subprocess.run(
            command,
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else [],
            cwd="/" if user is not None else None,  # it may not enter ours
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise BrokerError(
                f"{argv[0]} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result


@contextmanager
def database_url(settings: Settings, create: bool = False) -> Iterator[str]:
    """The database URL: the configured one, or the embedded server's (started if needed).
    Unless `create`, an embedded cluster that does not exist yet is an error, not created."""
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
