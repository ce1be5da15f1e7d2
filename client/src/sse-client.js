// pgsse-client: a dependency-free ES module over EventSource (the npm package's main entry,
// and what the broker serves as /static/sse-client.js).
//
//   import { createSSEClient } from "pgsse-client"; // or "/static/sse-client.js"
//   const client = createSSEClient({ sessionId: "123", onMessage: (m) => console.log(m) });
//   client.connect();
//
// Why not rely on EventSource's own reconnect: it gives up for good on an HTTP error (the
// broker's 503 at its connection cap, a 502 from a proxy) and after such a failure nobody
// resumes. So on every failure this client closes the EventSource itself and opens a new one
// after a delay (capped exponential backoff with jitter), up to `maxReconnectAttempts`
// consecutive failures (Infinity, the default: never give up), and every new stream asks the
// broker to replay from the last id seen (`lastEventId` query parameter), so neither an outage
// nor a manual disconnect()/connect() loses a message. The broker's own `error` events ("slow
// consumer", "server shutting down", "replay limit reached") end a stream on purpose; the
// client reconnects from its last id in the same way.
//
// Options: baseUrl ("" = same origin), sessionId and robotId (null = any), token (a string,
// or a function called at each connect, for a broker with BROKER_AUTH_SECRET),
// reconnectInterval (ms, 3000), maxReconnectInterval (ms, 30000), maxReconnectAttempts
// (Infinity), autoReconnect (true), maxMessages (500), history (null, or 1 to 1000: the last
// rows to show first when there is no resume point), lastEventId (resume point of a new
// client), onMessage(message), onConnected(event), onDisconnected(reason), onError(error), and
// EventSource (a replacement constructor, e.g. a polyfill). A bad value throws a TypeError
// naming the option. Types: sse-client.d.ts.
//
// Messages are kept deduplicated by id (the last 10000 ids received are remembered, across
// reconnects and clearMessages()), in id order, at most `maxMessages` of them (the oldest go
// first). State: `connected`, `messages`, `error` (a string or null), `reconnectAttempts`
// (consecutive failed attempts, 0 once connected), `lastEventId`, and `status`: "idle",
// "connecting", "connected", "reconnecting" or "failed" (attempts exhausted).

const DEFAULTS = {
  baseUrl: "",
  sessionId: null,
  robotId: null,
  token: null,
  reconnectInterval: 3000,
  maxReconnectInterval: 30000,
  maxReconnectAttempts: Infinity,
  autoReconnect: true,
  maxMessages: 500,
  history: null,
  lastEventId: null,
  onMessage: null,
  onConnected: null,
  onDisconnected: null,
  onError: null,
  EventSource: null,
};

/** English labels of the statuses, for a status line. */
export const STATUS_TEXT = Object.freeze({
  idle: "Disconnected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  failed: "Connection failed",
});

// Row ids are decimal strings of up to 19 digits, beyond a double's exact range: compare them
// as strings (a longer canonical decimal is larger).
export function compareIds(a, b) {
  const x = String(a);
  const y = String(b);
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

const RESUMABLE = /^[0-9]{1,19}$/;
const SEEN_LIMIT = 10000;
const HISTORY_LIMIT = 1000; // the broker's bound on `history`

// Checked at once, naming the option: a mistyped value would otherwise show up much later, as
// a client that reconnects in a tight loop or never at all.
function checkOptions(opts) {
  const fail = (name, what) => {
    const value = opts[name];
    const shown = typeof value === "string" ? JSON.stringify(value) : String(value);
    throw new TypeError(`pgsse-client: ${name} must be ${what}, not ${shown}`);
  };
  for (const name of ["reconnectInterval", "maxReconnectInterval"]) {
    if (!(Number.isFinite(opts[name]) && opts[name] >= 0)) fail(name, "a number of ms >= 0");
  }
  for (const name of ["maxReconnectAttempts", "maxMessages"]) {
    const value = opts[name];
    if (!(value >= 0 && (Number.isInteger(value) || value === Infinity))) {
      fail(name, "an integer >= 0 or Infinity");
    }
  }
  const { history } = opts;
  const historyOk = Number.isInteger(history) && history >= 1 && history <= HISTORY_LIMIT;
  if (history !== null && !historyOk) {
    fail("history", `an integer from 1 to ${HISTORY_LIMIT}, or null`);
  }
}

export function createSSEClient(options = {}) {
  const opts = { ...DEFAULTS };
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) opts[key] = value;
  }
  checkOptions(opts);
  const EventSourceImpl = opts.EventSource || globalThis.EventSource;

  let source = null; // the open EventSource, if any
  let timer = null; // the pending reconnect, if any
  let wanted = false; // connect() called and not disconnect()
  let lastEventId = RESUMABLE.test(String(opts.lastEventId ?? "")) ? String(opts.lastEventId) : null;
  let messages = [];
  const seen = new Set(); // ids received lately, so a replayed row is never shown twice
  let state = snapshot({ connected: false, messages, error: null, reconnectAttempts: 0 });
  const listeners = new Set();

  function snapshot(fields) {
    let status = "idle";
    if (fields.connected) status = "connected";
    else if (wanted) status = fields.reconnectAttempts > 0 ? "reconnecting" : "connecting";
    else if (fields.error) status = "failed";
    return Object.freeze({ ...fields, status, lastEventId });
  }

  function update(changes) {
    state = snapshot({ ...state, ...changes });
    for (const listener of [...listeners]) listener(state);
  }

  function call(name, ...args) {
    const handler = opts[name];
    if (typeof handler !== "function") return;
    try {
      handler(...args);
    } catch (error) {
      // A throwing callback must not break the stream; report it where developers look.
      console.error(`pgsse: ${name} threw`, error);
    }
  }

  function streamUrl() {
    const params = new URLSearchParams();
    if (opts.sessionId != null && opts.sessionId !== "") params.set("sessionId", opts.sessionId);
    if (opts.robotId != null && opts.robotId !== "") params.set("robotId", opts.robotId);
    // History only opens a stream that has nothing to resume from (the broker ignores it
    // beside a resume point anyway); later rows come by replay after the last one shown.
    if (lastEventId !== null) params.set("lastEventId", lastEventId);
    else if (opts.history !== null) params.set("history", String(opts.history));
    // EventSource cannot send an Authorization header; a function is asked again on every
    // reconnect, so an expiring token can be renewed.
    const token = typeof opts.token === "function" ? opts.token() : opts.token;
    if (token) params.set("token", token);
    const query = params.toString();
    return `${String(opts.baseUrl).replace(/\/+$/, "")}/api/sse/messages${query ? `?${query}` : ""}`;
  }

  function open() {
    timer = null;
    const es = new EventSourceImpl(streamUrl());
    let opened = false;
    source = es;
    es.onopen = () => {
      opened = true;
    };
    es.onmessage = (event) => {
      if (source === es) receive(event);
    };
    // EventSource cannot tell why: refused, unreachable, or an HTTP error such as 503.
    es.onerror = () => {
      if (source === es) lost(opened ? "connection lost" : "could not connect");
    };
  }

  function close() {
    if (source) {
      source.onopen = null;
      source.onmessage = null;
      source.onerror = null;
      source.close();
      source = null;
    }
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
  }

  function receive(event) {
    let body;
    try {
      body = JSON.parse(event.data);
    } catch {
      return; // not ours; the broker only sends JSON objects
    }
    switch (body && body.type) {
      case "connected":
        update({ connected: true, error: null, reconnectAttempts: 0 });
        call("onConnected", body);
        break;
      case "message":
        if (body.data) add(body.data, event.lastEventId);
        break;
      case "error":
        // The broker ends this stream on purpose; resume from the last id on a new one.
        lost(String(body.error || "stream closed by the server"), /^replay limit/.test(body.error));
        break;
      default:
        break; // heartbeat, or a type this client does not know yet
    }
  }

  function add(message, sseId) {
    const id = String(message.id ?? sseId ?? "");
    if (!RESUMABLE.test(id)) return;
    // The last id received, as EventSource keeps it: the broker resumes after that row in
    // its delivery (commit) order, which is not always id order.
    lastEventId = id;
    if (seen.has(id)) return;
    seen.add(id);
    if (seen.size > SEEN_LIMIT) seen.delete(seen.values().next().value);
    const limit = Math.max(0, opts.maxMessages);
    // Kept in id order and trimmed from the oldest: a row older than all of a full history
    // would go at once, but it is still reported.
    if (messages.length < limit || (limit > 0 && compareIds(id, messages[0].id) > 0)) {
      const next = messages.slice();
      let at = next.length;
      while (at > 0 && compareIds(next[at - 1].id, id) > 0) at -= 1;
      next.splice(at, 0, message);
      if (next.length > limit) next.splice(0, next.length - limit);
      messages = next;
      update({ messages });
    } else {
      update({});
    }
    call("onMessage", message);
  }

  function lost(reason, immediately = false) {
    const wasConnected = state.connected;
    close();
    const changes = { connected: false };
    let error = null;
    if (wanted) {
      const attempt = state.reconnectAttempts + 1;
      const max = opts.maxReconnectAttempts;
      if (opts.autoReconnect && attempt <= max) {
        timer = setTimeout(open, immediately && attempt === 1 ? 0 : delay(attempt));
        const of = max === Infinity ? "" : ` of ${max}`;
        error = `${reason}: reconnecting (attempt ${attempt}${of})`;
        changes.reconnectAttempts = attempt;
      } else {
        wanted = false;
        error = opts.autoReconnect ? `${reason}: gave up after ${max} reconnect attempts` : reason;
      }
      changes.error = error;
    }
    update(changes);
    if (wasConnected) call("onDisconnected", reason);
    if (error !== null) call("onError", error);
  }

  // Exponential backoff from reconnectInterval, capped, with "equal jitter": a random delay
  // in [d/2, d], so clients dropped together (a broker restart) do not return together. The
  // exponent is bounded too: with no limit on attempts, 2 ** attempt would reach Infinity,
  // and 0 * Infinity is NaN (a retry loop with no delay at all).
  function delay(attempt) {
    const growth = 2 ** Math.min(attempt - 1, 30);
    const base = Math.min(opts.reconnectInterval * growth, opts.maxReconnectInterval);
    return base / 2 + Math.random() * (base / 2);
  }

  const client = {
    /** Open the stream (resuming after the last id seen). Resets the attempt count. */
    connect() {
      const wasConnected = state.connected;
      wanted = true;
      close();
      update({ error: null, reconnectAttempts: 0, connected: false });
      if (wasConnected) call("onDisconnected", "reconnecting");
      open();
    },
    /** Close the stream and stop reconnecting; messages and the last id are kept. */
    disconnect() {
      const wasConnected = state.connected;
      wanted = false;
      close();
      update({ connected: false, reconnectAttempts: 0, error: null });
      if (wasConnected) call("onDisconnected", "disconnected");
    },
    /** Forget the messages held; the stream still resumes after the last id seen, and a
     * row already received does not come back. */
    clearMessages() {
      messages = [];
      update({ messages });
    },
    /** Call `listener(state)` on every change; returns the function that unsubscribes. */
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    /** The current state, an immutable object that changes identity on every update. Its
     * `messages` array changes identity only when the messages do. */
    getSnapshot() {
      return state;
    },
    /** True while a reconnect is scheduled. */
    get reconnecting() {
      return timer !== null;
    },
    /** "idle", "connecting", "connected", "reconnecting" or "failed" (gave up). */
    get status() {
      return state.status;
    },
    get connected() {
      return state.connected;
    },
    get messages() {
      return state.messages;
    },
    get error() {
      return state.error;
    },
    get reconnectAttempts() {
      return state.reconnectAttempts;
    },
    get lastEventId() {
      return lastEventId;
    },
    get url() {
      return streamUrl();
    },
  };
  return client;
}
