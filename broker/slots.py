"""The WAL capture's database objects (`BROKER_CAPTURE=wal`): the publication, the logical
replication slot and the messages table's capture, which `pgsse migrate` makes and `pgsse
migrate --drop-capture` drops. `feeds/wal.py` reads the slot.

In wal mode the messages table has no trigger: the publication holds it (inserts only), so
its inserts reach the slot's reader as rows (`wal.Decoder`). The feeds' triggers
(`feeds/capture.py`) emit their changes as logical messages (`capture_step`).

Switching to the mode, `migrate` makes the slot, and only then, in one transaction, applies
`sql/`, puts `messages` in the publication and drops its NOTIFY trigger (`wal_capture_sql`):
every insert committed after that is decoded from the WAL after the slot's start, so none is
missed; rows committed before were notified (and backfill covers a broker that was not
listening). The trigger's drop waits for the transactions inserting at that moment (its lock
conflicts with theirs), so each row is either notified or decoded, never neither. `sql/` and
the swap in one transaction: a `serve` migrating while another broker reads the slot never
leaves a moment of NOTIFY. Going back (`notify_capture_sql`) is the same transaction the other
way: `sql/` makes the trigger again, and `messages` leaves the publication; then
`--drop-capture` drops the slot.

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
    "MESSAGES_TABLE",
    "NOTIFY_TRIGGER",
    "PLUGIN",
    "PREFIX",
    "PUBLICATION",
    "SlotBusy",
    "SlotError",
    "SlotInvalidated",
    "SlotMissing",
    "capture_step",
    "drop",
    "notify_capture_sql",
    "prepare",
    "wal_capture_sql",
]

CAPTURE_MODES = ("notify", "wal")
PREFIX = "pgsse_messages"  # the messages' logical-message prefix: the NOTIFY channel's name
PUBLICATION = "pgsse_capture"  # pgoutput's: table `messages`, inserts only
MESSAGES_TABLE = "messages"
NOTIFY_TRIGGER = "trigger_notify_new_message"  # sql/002_notify.sql's, on `messages`
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


def wal_capture_sql() -> str:
    """The wal mode's messages capture, in the migration's transaction after `sql/`: the
    table in the publication, inserts only, and no trigger (`sql/` just made it again).
    Idempotent. A role that could write the table could always insert rows; what it cannot
    do is make the WAL carry a row the table does not hold (docs/security.md)."""
    return (
        f"ALTER PUBLICATION {PUBLICATION} SET TABLE {MESSAGES_TABLE};\n"
        f"ALTER PUBLICATION {PUBLICATION} SET (publish = 'insert');\n"
        f"DROP TRIGGER IF EXISTS {NOTIFY_TRIGGER} ON {MESSAGES_TABLE};\n"
    )


def notify_capture_sql() -> str:
    """The notify mode's counterpart, after `sql/` (which makes the NOTIFY trigger): a
    publication left from the wal mode no longer holds `messages`, so a slot kept meanwhile
    does not also decode the rows NOTIFY carried. Idempotent."""
    return f"""\
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_publication_tables
               WHERE pubname = '{PUBLICATION}' AND tablename = '{MESSAGES_TABLE}') THEN
        ALTER PUBLICATION {PUBLICATION} DROP TABLE {MESSAGES_TABLE};
    END IF;
END;
$$;
"""


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
