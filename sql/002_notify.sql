-- The key notifications and bus entries are signed with: 64 random bytes made here, once,
-- by the first `pgsse migrate`, readable by its owner only (the broker's role, and the trigger,
-- which runs as its owner). A role that may NOTIFY but not read this table cannot forge a
-- notification or a bus entry the broker accepts (docs/security.md). `inner_pad`/`outer_pad`
-- are the key XOR HMAC's ipad/opad, so the trigger computes HMAC-SHA256 with two sha256().
CREATE TABLE IF NOT EXISTS pgsse_key (
    one       boolean PRIMARY KEY DEFAULT true CHECK (one),
    key       bytea   NOT NULL CHECK (octet_length(key) = 64),
    inner_pad bytea   NOT NULL,
    outer_pad bytea   NOT NULL
);
REVOKE ALL ON pgsse_key FROM PUBLIC;

DO $$
DECLARE
    k bytea;
    i bytea;
    o bytea;
BEGIN
    IF NOT EXISTS (SELECT FROM pgsse_key) THEN
        -- gen_random_uuid() draws from the server's strong random source; the key never
        -- appears in a query text or a log.
        k := sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
            || sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'));
        i := k;
        o := k;
        FOR n IN 0..63 LOOP
            i := set_byte(i, n, get_byte(k, n) # 54);   -- 0x36
            o := set_byte(o, n, get_byte(k, n) # 92);   -- 0x5c
        END LOOP;
        INSERT INTO pgsse_key VALUES (true, k, i, o);
    END IF;
END;
$$;

-- One notification per inserted row, on the one fixed channel the broker LISTENs to.
--
-- The payload is the row in the wire shape of the SSE `message` event's `data`, so the broker
-- parses it once and never queries for it, preceded by 64 hex digits: its HMAC-SHA256 with
-- pgsse_key (the broker drops a payload whose signature does not verify). NOTIFY payloads must
-- stay under 8000 bytes: a row that would not fit is sent as a reference ({"id", "ref": true,
-- and the routing keys when they fit}) and the broker reads the row. Nothing here can raise
-- for a large row, so no INSERT ever fails because of the notification.
--
-- SECURITY DEFINER: it runs as its owner, who alone reads pgsse_key, whoever inserts.
CREATE OR REPLACE FUNCTION notify_new_message() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    payload text;
    pads record;
BEGIN
    payload := json_build_object(
        'id', NEW.id::text,
        'sessionId', NEW.session_id,
        'robotId', NEW.robot_id,
        'content', NEW.content,
        'isFromBot', NEW.is_from_bot,
        'isHuman', NEW.is_human,
        'intent', NEW.intent,
        'createdAt', to_char(NEW.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
    )::text;
    IF octet_length(payload) >= 7800 THEN
        payload := json_build_object(
            'id', NEW.id::text, 'ref', true,
            'sessionId', NEW.session_id, 'robotId', NEW.robot_id
        )::text;
        IF octet_length(payload) >= 7800 THEN
            payload := json_build_object('id', NEW.id::text, 'ref', true)::text;
        END IF;
    END IF;
    SELECT inner_pad, outer_pad INTO pads FROM pgsse_key;
    payload := encode(
        sha256(pads.outer_pad || sha256(pads.inner_pad || convert_to(payload, 'UTF8'))), 'hex'
    ) || payload;
    PERFORM pg_notify('pgsse_messages', payload);
    RETURN NULL;
END;
$$;
REVOKE ALL ON FUNCTION notify_new_message() FROM PUBLIC;

CREATE OR REPLACE TRIGGER trigger_notify_new_message
    AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION notify_new_message();
