-- One notification per inserted row, on the one fixed channel the broker LISTENs to.
--
-- The payload is the row in the wire shape of the SSE `message` event's `data`, so the broker
-- parses it once and never queries for it. NOTIFY payloads must stay under 8000 bytes: a row
-- that would not fit is sent as a reference ({"id", "ref": true, and the routing keys when
-- they fit}) and the broker reads the row. Nothing here can raise for a large row, so no
-- INSERT ever fails because of the notification.
CREATE OR REPLACE FUNCTION notify_new_message() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
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
    IF octet_length(payload) >= 7900 THEN
        payload := json_build_object(
            'id', NEW.id::text, 'ref', true,
            'sessionId', NEW.session_id, 'robotId', NEW.robot_id
        )::text;
        IF octet_length(payload) >= 7900 THEN
            payload := json_build_object('id', NEW.id::text, 'ref', true)::text;
        END IF;
    END IF;
    PERFORM pg_notify('pgsse_messages', payload);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER trigger_notify_new_message
    AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION notify_new_message();
