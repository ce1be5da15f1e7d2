"""PostgreSQL itself: the embedded server for `make run` and tests, and migrations.

The embedded server runs the binaries that the pgserver package ships (so nothing but PyPI is
needed), listening on a Unix socket inside its data directory only. Running as root, it runs
them as the unprivileged user `pgserver`, as PostgreSQL refuses to run as root.

`migrate` applies `sql/*.sql` in name order under a transaction-scoped advisory lock, so
instances that start together apply them one after the other; every file is idempotent.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from urllib.parse import quote

import psycopg
import structlog

from .errors import BrokerError

__all__ = ["EmbeddedPostgres", "migrate", "sql_files"]

MIGRATION_LOCK = 0x70677373  # "pgss": the advisory lock key migrations serialise on
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep room for "/.s.PGSQL.5432"

log = structlog.get_logger(logger_name="broker.database")


def sql_dir() -> Path:
    """`sql/` of the checkout (editable install) or the copy inside the wheel."""
    for candidate in (Path(__file__).parent / "sql", Path(__file__).parent.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise BrokerError("no sql/ directory found beside the broker package")


def sql_files() -> list[Path]:
    return sorted(sql_dir().glob("*.sql"))


def migrate(url: str) -> list[str]:
    """Apply every file of `sql/` in one transaction; returns the file names applied."""
    files = sql_files()
    try:
        with psycopg.connect(url, connect_timeout=10) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            for path in files:
                conn.execute(path.read_text(encoding="utf-8").encode())
    except psycopg.Error as exc:
        raise BrokerError(f"migration failed: {type(exc).__name__}: {exc}".strip()) from exc
    names = [path.name for path in files]
    log.info("migrated", files=names)
    return names


class _PgserverParts:
    def __init__(self) -> None:
        with warnings.catch_warnings():
            # pgserver looks up a runtime directory at import and warns when XDG_RUNTIME_DIR
            # is unset; we use neither the directory nor its server class.
            warnings.simplefilter("ignore")
            import pgserver._commands
            import pgserver.utils

        self.POSTGRES_BIN_PATH: Path = pgserver._commands.POSTGRES_BIN_PATH
        self.utils = pgserver.utils


@functools.cache
def _pgserver() -> _PgserverParts:
    """pgserver, imported on first use: only the embedded server needs it."""
    return _PgserverParts()


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, created on first start. Blocking calls."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.absolute()
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "pgserver"

    @property
    def bin_dir(self) -> Path:
        return Path(_pgserver().POSTGRES_BIN_PATH)

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= SOCKET_PATH_MAX:
            return self.data_dir
        return Path("/tmp") / f"pgsse-{abs(hash(self.data_dir)):x}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"

    def is_running(self) -> bool:
        result = self._run(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def start(self) -> None:
        """Create the cluster if needed and start it; no-op if it is running."""
        self._prepare()
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
        options = f"-h '' -k {self.socket_dir} -c max_connections=200 -c fsync=on"
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
        log.info("embedded_postgres_started", data_dir=str(self.data_dir))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` ends sessions, `immediate` is a crash); no-op if stopped."""
        if self.is_running():
            self._run(["pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data_dir)])
            log.info("embedded_postgres_stopped", data_dir=str(self.data_dir), mode=mode)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        utils = _pgserver().utils
        utils.ensure_user_exists(self._user)
        utils.ensure_prefix_permissions(self.data_dir)
        utils.ensure_prefix_permissions(self.bin_dir)
        shutil.chown(self.data_dir, self._user, self._user)
        shutil.chown(self.socket_dir, self._user, self._user)

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        result = subprocess.run(
            command,
            user=self._user,
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
