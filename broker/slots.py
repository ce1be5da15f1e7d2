"""The WAL capture's database objects (`BROKER_CAPTURE=wal`): the trigger's step,
the publication and the logical replication slot that `pgsse migrate` makes and `pgsse
migrate --drop-capture` drops. `feeds/wal.py` reads the slot.

Switching to the mode, `migrate` makes the slot, and only then, in one transaction, applies
`sql/` and makes the triggers emit logical messages: every message emitted is after the
slot's start, so none is missed; rows committed before that were notified (and backfill
covers a broker that was not listening). `sql/` and the swap in one transaction: a `serve`
migrating while another broker reads the slot never leaves a moment of NOTIFY. Dropping
goes the other way: NOTIFY trigger first, then the slot.

A slot nobody reads keeps every WAL segment written since its position: on a busy database
that fills the disk, unless `max_slot_wal_keep_size` makes PostgreSQL invalidate the slot
first. Drop the slot of a database that leaves the mode.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import errors, sql

from .errors import BrokerError

__all__ = [
    "CAPTURE_MODES",
    "PLUGIN",
    "PREFIX",
    "PUBLICATION",
    "SlotBusy",
    "SlotError",
    "SlotInvalidated",
    "SlotMissing",
    "capture_step",
    "drop",
    "prepare",
    "wal_trigger_sql",
]

CAPTURE_MODES = ("notify", "wal")
PREFIX = "pgsse_messages"  # the messages' logical-message prefix: the NOTIFY channel's name
PUBLICATION = "pgsse_capture"  # pgoutput needs one; it holds no table
PLUGIN = "pgoutput"

log = structlog.get_logger(logger_name=__name__)


class SlotError(BrokerError):
    """The capture slot cannot be read; the message says what to do."""


class SlotMissing(SlotError):
    """No such slot in this database: `pgsse migrate` with BROKER_CAPTURE=wal makes it."""


class SlotBusy(SlotError):
    """Another session is reading the slot (two readers for one database)."""


class SlotInvalidated(SlotError):
    """PostgreSQL dropped the WAL the slot needed (`max_slot_wal_keep_size` exceeded): what
    committed since its position is no longer in the WAL and must come from the tables."""


# -- the trigger's step ---------------------------------------------------------------------


def capture_step(mode: str, prefix: str, payload: str) -> str:
    """The PL/pgSQL statement that hands the signed `payload` (a variable name) on: NOTIFY on
    channel `prefix`, or a transactional logical message with that prefix. The one place the
    modes' triggers differ; the change log's trigger (feeds/capture.py) uses it too."""
    literal = "'" + prefix.replace("'", "''") + "'"
    if mode == "notify":
        return f"PERFORM pg_notify({literal}, {payload});"
    if mode == "wal":
        return f"PERFORM pg_logical_emit_message(true, {literal}, {payload});"
    raise ValueError(f"unknown capture mode {mode!r}; expected one of {CAPTURE_MODES}")


def wal_trigger_sql(notify_sql: str) -> str:
    """`notify_new_message()` of `sql/002_notify.sql` (given as `notify_sql`) with its one
    `pg_notify` step made a logical message: same signature, payload and signature bytes,
    same reference path for large rows, so the broker parses both modes' payloads alike."""
    start = notify_sql.index("CREATE OR REPLACE FUNCTION notify_new_message()")
    end = notify_sql.index("$$;", start) + len("$$;")
    function = notify_sql[start:end]
    step = capture_step("notify", PREFIX, "payload")
    if function.count(step) != 1:
        raise BrokerError(f"sql/002_notify.sql: expected one {step!r} in notify_new_message()")
    return function.replace(step, capture_step("wal", PREFIX, "payload"))


# -- migrate and drop -----------------------------------------------------------------------


def prepare(conn: psycopg.Connection[Any], slot: str, lock: int) -> bool:
    """Create the publication and the slot unless they exist; True when the slot was made.

    Runs outside the migration's transaction (PostgreSQL refuses to create a slot in a
    transaction that wrote), in one of its own under the same advisory lock `lock`, so
    instances migrating together make one slot. Creating waits for the transactions running
    at that moment to end (the slot's starting snapshot)."""
    level = conn.execute("SHOW wal_level").fetchone()
    if not level or level[0] != "logical":
        raise BrokerError(
            f"BROKER_CAPTURE=wal needs wal_level=logical (it is {level[0] if level else None!r}):"
            " ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL; on a managed"
            " service, its logical replication setting (README, 'Capture without NOTIFY')"
        )
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        found = _slot_exists(conn, slot)
        if not conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(PUBLICATION)))
    if found:
        return False
    with conn.transaction():  # a new one: the publication's was a write
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        if _slot_exists(conn, slot):
            return False  # made meanwhile by an instance migrating too
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, PLUGIN))
    log.info("capture_slot_created", slot=slot)
    return True


def _slot_exists(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Whether this database's capture slot `slot` exists; a slot of that name for another
    database or plugin raises, naming the setting."""
    found = conn.execute(
        "SELECT database, plugin, database = current_database()"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if found is None:
        return False
    if not found[2] or found[1] != PLUGIN:
        raise BrokerError(
            f"invalid BROKER_CAPTURE_SLOT={slot!r}: that replication slot exists for"
            f" database {found[0]!r} with plugin {found[1]!r}; choose another name"
        )
    return True


def drop(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Drop the slot and the publication if they exist; True when a slot was dropped. A slot
    being read right now is refused (`SlotBusy`): stop the broker reading it first."""
    try:
        row = conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND database = current_database()",
            (slot,),
        ).fetchone()
    except errors.ObjectInUse:
        raise SlotBusy(f"the capture slot {slot!r} is being read; stop that broker first") from None
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION)))
    if row is not None:
        log.info("capture_slot_dropped", slot=slot)
    return row is not None
