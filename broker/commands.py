"""`pgsse migrate | publish | clean`: the one-shot commands on the database and its files.

Each prints its result and raises `BrokerError` with a one-line reason (`cli.py` prints it).
They use the configured database or an embedded cluster that exists already
(`database.database_url`); `clean` looks at the embedded server's files only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path

import orjson

from . import database
from .config.settings import Settings
from .database import EmbeddedPostgres, database_url, postmaster_alive
from .embedded.placement import BASE, orphaned, source_file
from .errors import BrokerError
from .store import Store

__all__ = ["clean", "migrate", "publish"]


def migrate(settings: Settings, print_only: bool = False, drop_capture: bool = False) -> int:
    """Apply sql/ and the declared feeds' capture; or print it, or drop the WAL capture."""
    if drop_capture and settings.capture == "wal":
        raise BrokerError("--drop-capture leaves BROKER_CAPTURE=wal: unset BROKER_CAPTURE first")
    with database_url(settings) as url:
        if print_only:
            sys.stdout.write(
                database.migration_sql(
                    url, settings.config, settings.capture, settings.capture_slot
                )
            )
            return 0
        if drop_capture:
            dropped = database.drop_capture(url, settings.capture_slot, settings.config)
            sys.stdout.write(
                f"capture slot {settings.capture_slot}: {'dropped' if dropped else 'none'}\n"
            )
            return 0
        files = database.migrate(url, settings.config, settings.capture, settings.capture_slot)
    sys.stdout.write("migrated: " + ", ".join(files) + "\n")
    return 0


def clean(settings: Settings, remove: bool) -> int:
    """What the embedded PostgreSQL keeps: BROKER_DATA_DIR's cluster (wherever it really is),
    then every entry of /var/lib/pgsse, where its files go when run by root. With `remove`:
    BROKER_DATA_DIR's cluster, and every stopped one there whose BROKER_DATA_DIR no longer
    leads to it (a removed checkout, a test run that was killed). A cluster whose origin is
    not recorded (made by an older pgsse) is only shown: it may be another checkout's data."""

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


def publish(settings: Settings, session: str, robot: str | None, text: str) -> int:
    """Insert one message and print it as the API would."""

    async def insert(url: str) -> None:
        async with Store.open(url) as store:
            message = await store.insert(session, text, robot)
        sys.stdout.write(orjson.dumps(message.as_json()).decode() + "\n")

    with database_url(settings) as url:
        asyncio.run(insert(url))
    return 0
