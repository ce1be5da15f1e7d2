"""The SQL `pgsse migrate` runs for the declared feeds (and `pgsse migrate --print` shows).

What it installs, every statement idempotent (run under the migration advisory lock, in the
same transaction as `sql/`):

- schema `pgsse`; `pgsse.changes`, the change log (a transactional outbox: each change is
  inserted in the writer's own transaction); `pgsse.position_seq`, the positions of every feed
  but messages; `pgsse.retention`, how far each feed's log was pruned (`changelog.py`);
- one generic trigger function `pgsse.capture()`, SECURITY DEFINER (writers need no grant on
  the log) with its search path pinned;
- per feed, trigger `pgsse_capture_<feed>` AFTER its declared events FOR EACH ROW (the messages
  feed: only its updates and deletes; its inserts keep `notify_new_message`, or in wal mode
  come from the WAL itself, and replay from the table);
- a block that drops every `pgsse_capture_*` trigger of `pgsse.capture()` that no declared
  feed wants any more (its feed removed, or moved to another table).

The trigger's arguments (TG_ARGV), all computed here from the catalog at migrate time:
0 feed name, 1 position sequence, 2 route columns (key, filters, primary key), 3 columns left
out of `data`, 4 columns left out of a delete's `data` (all but the route), 5 timestamptz
columns, 6 timestamp columns. A change of a feed table's columns needs `pgsse migrate` again.

What the trigger records: `data` is the declared columns of NEW (insert, update) or the route
columns of OLD (delete), values as `to_jsonb` writes them except timestamps, written as UTC
with milliseconds and `Z` (a `timestamp` without time zone is taken to be UTC already;
infinities stay `"infinity"`). An update carries `old`: the previous values of the route
columns that changed (null if none did). An update that changes none of the feed's columns
records nothing.

No write to a feed table fails because of capture: nothing in the function raises for any value
(each step is total: `to_jsonb` of any type, the timestamp round trip of `to_jsonb`'s own ISO
text), and the notification is the change only when it fits in `NOTIFY_LIMIT` bytes, else a
reference `{"feed", "position", "ref": true}` from which the broker reads the change. There is
no EXCEPTION block: each would cost a subtransaction per row.

Capture mode `notify` (default) notifies channel `CHANNEL`; `wal` writes the same signed
payload as a transactional logical message with prefix `CHANNEL`
(`pg_logical_emit_message(true, ...)`, no commit lock), which the capture slot's reader
hands to the same dispatch (`walcapture.py`). Where `sql/` made a
signing key (table `pgsse_key`), each notification is preceded by its HMAC-SHA256 in 64 hex
digits, exactly as `notify_new_message` signs its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from ..config.feeds import Feed
from ..slots import capture_step

__all__ = [
    "CAPTURE_MODES",
    "CHANNEL",
    "NOTIFY_LIMIT",
    "capture_sql",
    "captured_events",
    "trigger_name",
]

CHANNEL = "pgsse_changes"
NOTIFY_LIMIT = 7800  # bytes of JSON; with a 64-digit signature under PostgreSQL's 8000
CAPTURE_MODES = ("notify", "wal")
TIMESTAMP_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'  # as sql/002_notify.sql writes createdAt

SCHEMA = """\
CREATE SCHEMA IF NOT EXISTS pgsse;

-- The change log: one row per captured change, inserted in the writer's transaction.
CREATE TABLE IF NOT EXISTS pgsse.changes (
    feed     text        NOT NULL,
    position bigint      NOT NULL,
    op       "char"      NOT NULL,  -- 'i' insert, 'u' update, 'd' delete
    data     jsonb       NOT NULL,  -- declared columns of NEW; a delete: route columns of OLD
    old      jsonb,                 -- an update: previous values of the route columns changed
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (feed, position)
);
-- Pruning: DELETE ... WHERE at < cutoff in small batches. BRIN, not btree: `at` follows the
-- insert order, and a btree would add an index insertion to every captured write.
CREATE INDEX IF NOT EXISTS changes_at_brin ON pgsse.changes USING brin (at);

-- Positions of every feed but messages (whose positions are its own row ids).
CREATE SEQUENCE IF NOT EXISTS pgsse.position_seq AS bigint;

-- How far each feed's log was pruned: a resume from below `pruned_through` gets `reset`.
CREATE TABLE IF NOT EXISTS pgsse.retention (
    feed           text   PRIMARY KEY,
    pruned_through bigint NOT NULL
);
"""

FUNCTION = """\
-- UTC with milliseconds and Z for the timestamp columns of `doc` (to_jsonb's ISO text, read
-- back: a lossless round trip for every finite value; an infinity is left as it is).
-- No SET clause (it would cost a configuration save and restore per call): only
-- pg_catalog's functions are called, and the caller, pgsse.capture(), pins the search path.
CREATE OR REPLACE FUNCTION pgsse.utc_ms(doc jsonb, tz text[], naive text[]) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    col text;
    formatted text;
BEGIN
    FOREACH col IN ARRAY tz LOOP
        IF jsonb_typeof(doc -> col) = 'string' THEN
            formatted := to_char(
                (doc ->> col)::timestamptz AT TIME ZONE 'UTC', '{format}');
            IF formatted IS NOT NULL THEN
                doc := jsonb_set(doc, ARRAY[col], to_jsonb(formatted));
            END IF;
        END IF;
    END LOOP;
    FOREACH col IN ARRAY naive LOOP
        IF jsonb_typeof(doc -> col) = 'string' THEN
            formatted := to_char((doc ->> col)::timestamp, '{format}');
            IF formatted IS NOT NULL THEN
                doc := jsonb_set(doc, ARRAY[col], to_jsonb(formatted));
            END IF;
        END IF;
    END LOOP;
    RETURN doc;
END;
$fn$;

-- One change of a feed's table into pgsse.changes (and a notification): see broker/capture.py.
CREATE OR REPLACE FUNCTION pgsse.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_feed text := TG_ARGV[0];
    v_route text[] := TG_ARGV[2]::text[];
    v_tz text[] := TG_ARGV[5]::text[];
    v_naive text[] := TG_ARGV[6]::text[];
    v_stamped boolean := cardinality(v_tz) + cardinality(v_naive) > 0;
    v_op "char";
    v_data jsonb;
    v_before jsonb;
    v_old jsonb;
    v_col text;
    v_pos bigint;
    v_at timestamptz := clock_timestamp();
    v_payload text;
    v_stamp text;
    v_pads record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_op := 'i';
        v_data := to_jsonb(NEW) - TG_ARGV[3]::text[];
    ELSIF TG_OP = 'UPDATE' THEN
        v_op := 'u';
        v_data := to_jsonb(NEW) - TG_ARGV[3]::text[];
        v_before := to_jsonb(OLD) - TG_ARGV[3]::text[];
        IF v_data = v_before THEN
            RETURN NULL;  -- none of the feed's columns changed
        END IF;
        FOREACH v_col IN ARRAY v_route LOOP
            IF (v_data -> v_col) IS DISTINCT FROM (v_before -> v_col) THEN
                v_old := coalesce(v_old, '{{}}'::jsonb)
                    || jsonb_build_object(v_col, coalesce(v_before -> v_col, 'null'::jsonb));
            END IF;
        END LOOP;
        IF v_stamped AND v_old IS NOT NULL THEN
            v_old := pgsse.utc_ms(v_old, v_tz, v_naive);
        END IF;
    ELSE
        v_op := 'd';
        v_data := to_jsonb(OLD) - TG_ARGV[4]::text[];
    END IF;
    IF v_stamped THEN  -- inline for the one column most feeds have; the function otherwise
        IF cardinality(v_tz) = 1 AND cardinality(v_naive) = 0 THEN
            v_col := v_tz[1];
            IF jsonb_typeof(v_data -> v_col) = 'string' THEN
                v_stamp := to_char((v_data ->> v_col)::timestamptz AT TIME ZONE 'UTC', '{format}');
                IF v_stamp IS NOT NULL THEN
                    v_data := jsonb_set(v_data, ARRAY[v_col], to_jsonb(v_stamp));
                END IF;
            END IF;
        ELSE
            v_data := pgsse.utc_ms(v_data, v_tz, v_naive);
        END IF;
    END IF;
    v_pos := nextval(TG_ARGV[1]::regclass);
    INSERT INTO pgsse.changes (feed, position, op, data, old, at)
        VALUES (v_feed, v_pos, v_op, v_data, v_old, v_at);
{notify}
    RETURN NULL;
END;
$fn$;
"""

GRANTS = """\
-- SECURITY DEFINER writes the log with the owner's rights, so no one else may attach it to a
-- table of theirs (which would forge changes of any feed): a trigger needs EXECUTE to be
-- created, not to fire, so every writer of a feed table is still captured.
REVOKE ALL ON FUNCTION pgsse.capture() FROM PUBLIC;
"""

NOTIFY = """\
    -- Built as text: one serialisation of `data` (json_build_object re-serialises jsonb).
    v_payload := concat(
        '{{"feed":', to_json(v_feed), ',"position":', v_pos,
        ',"op":"', CASE v_op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' ELSE 'delete' END,
        '","data":', v_data, ',"old":', coalesce(v_old::text, 'null'),
        ',"at":"', to_char(v_at AT TIME ZONE 'UTC', '{format}'), '"}}');
    IF octet_length(v_payload) >= {limit} THEN
        v_payload := concat('{{"feed":', to_json(v_feed), ',"position":', v_pos, ',"ref":true}}');
    END IF;
{sign}    {step}"""

# With a signing key (`sql/`'s pgsse_key, read by the owner only), the payload is preceded by
# its HMAC-SHA256 in 64 hex digits, as notify_new_message signs its own: a role that may
# NOTIFY but not read the key cannot forge a change the broker accepts.
SIGN = """\
    SELECT inner_pad, outer_pad INTO v_pads FROM {key_table};
    v_payload := encode(sha256(v_pads.outer_pad
        || sha256(v_pads.inner_pad || convert_to(v_payload, 'UTF8'))), 'hex') || v_payload;
"""

DROP_STALE = """\
-- Drop the capture triggers no declared feed wants (feeds removed from the file).
DO $drop$
DECLARE
    stale record;
BEGIN
    FOR stale IN
        SELECT t.tgname, t.tgrelid::regclass AS rel FROM pg_trigger t
        WHERE t.tgfoid = 'pgsse.capture()'::regprocedure AND NOT t.tgisinternal
          AND {keep}
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', stale.tgname, stale.rel);
    END LOOP;
END;
$drop$;
"""


def trigger_name(feed: Feed) -> str:
    return f"pgsse_capture_{feed.name}"


def captured_events(feed: Feed) -> tuple[str, ...]:
    """The events the feed's trigger fires on: the messages feed's inserts are not captured
    (they replay from the table and keep `notify_new_message`)."""
    return tuple(e for e in feed.events if not (feed.is_messages and e == "insert"))


def capture_sql(
    feeds: Sequence[Feed], mode: str = "notify", key_table: sql.Identifier | None = None
) -> str:
    """The SQL installing capture for `feeds`, and removing it from tables no feed wants.
    With `key_table` (the signing key's table, qualified), notifications are signed."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"unknown capture mode {mode!r}")
    sign = "" if key_table is None else SIGN.format(key_table=key_table.as_string(None))
    step = capture_step(mode, CHANNEL, "v_payload")
    notify = NOTIFY.format(format=TIMESTAMP_FORMAT, limit=NOTIFY_LIMIT, step=step, sign=sign)
    function = FUNCTION.format(format=TIMESTAMP_FORMAT, notify=notify)
    parts = [SCHEMA, function, GRANTS]
    wanted: list[sql.Composable] = []
    for feed in feeds:
        if not captured_events(feed):
            continue
        parts.append(_trigger(feed))
        wanted.append(
            sql.SQL("({}::regclass::oid, {})").format(
                sql.Literal(_relation(feed).as_string(None)), sql.Literal(trigger_name(feed))
            )
        )
    keep = (
        sql.SQL("(t.tgrelid, t.tgname::text) NOT IN ({})").format(sql.SQL(", ").join(wanted))
        if wanted
        else sql.SQL("true")
    )
    parts.append(DROP_STALE.format(keep=keep.as_string(None)))
    return "\n".join(parts)


def _relation(feed: Feed) -> sql.Identifier:
    return sql.Identifier(feed.schema, feed.table)


def _trigger(feed: Feed) -> str:
    events = " OR ".join(event.upper() for event in captured_events(feed))
    sequence = feed.sequence or "pgsse.position_seq"
    args = [
        feed.name,
        sequence,
        _array(feed.route),
        _array([c for c in feed.all_columns if c not in feed.columns]),
        _array([c for c in feed.all_columns if c not in feed.route]),
        _array(feed.timestamptz),
        _array(feed.timestamp),
    ]
    statement = sql.SQL(
        "CREATE OR REPLACE TRIGGER {name}\n    AFTER {events} ON {table}\n"
        "    FOR EACH ROW EXECUTE FUNCTION pgsse.capture({args});\n"
    ).format(
        name=sql.Identifier(trigger_name(feed)),
        events=sql.SQL(events),
        table=_relation(feed),
        args=sql.SQL(", ").join(map(sql.Literal, args)),
    )
    return f"-- feed {feed.name}: {', '.join(captured_events(feed))}\n" + statement.as_string(None)


def _array(names: Sequence[str]) -> str:
    """A text[] literal of `names`, every element quoted."""
    quoted = ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"' for name in names)
    return "{" + ",".join(quoted) + "}"
