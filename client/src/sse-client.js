// pgsse-client: a dependency-free ES module over EventSource (the npm package's main entry,
// and what the broker serves as /static/sse-client.js).
//
//   import { createSSEClient } from "pgsse-client"; // or "/static/sse-client.js"
//   const client = createSSEClient({ sessionId: "123", onMessage: (m) => console.log(m) });
//   client.connect();
//
// One connection per browser: by default (`shared: true`) the clients of every tab of an
// origin ride on one stream, held by a leader tab elected with the Web Locks API, which fans
// its events out to the other tabs over a BroadcastChannel (shared.js). Every tab's
// subscriptions are merged into the leader's stream (`sessionId` repeated); when the leader
// closes another tab takes over and resumes from the last id, so nothing is lost and, since
// each client drops ids it has seen, nothing is shown twice; a client that connects again
// has the stream resume from its own last id. A client asking for `history`
// (the last rows of its sessions), one with `shared: false`, and every client of a browser
// without Web Locks or BroadcastChannel open a stream of their own.
//
// Reconnects (connection.js): every failure closes the stream and opens a new one, the first
// retry within 0.5 s, then capped backoff with jitter, at once on `online` and when a hidden
// tab becomes visible; every new stream resumes after the last id seen, so neither an outage
// nor a manual disconnect()/connect() loses a message. An attempt with no answer for
// `stallTimeout` ms is reported as `stalled` (the browser's per-host connection limit).
//
// Options: baseUrl ("" = same origin), sessionId (a string, an array of them, or null = any),
// robotId (null = any), token (a string, or a function called at each connect), getToken (a
// function that may return a promise, called before each connect and when a token expired),
// reconnectInterval (ms, 3000), maxReconnectInterval (ms, 30000), maxReconnectAttempts
// (Infinity), autoReconnect (true), maxMessages (500), history (null, or 1 to 1000: the last
// rows to show first when there is no resume point), lastEventId (resume point of a new
// client), shared (true), stallTimeout (ms, 5000; 0: never report a stall), onMessage(message)
// (new messages only), onMessageUpdated(message), onMessageDeleted({ id, sessionId, robotId }),
// onReset(event), onEvent(event, id) (every event as the stream delivered it: connected,
// message, heartbeat, error, ...), onConnected(event), onDisconnected(reason), onError(error), and EventSource (a replacement
// constructor, e.g. a polyfill). A bad value throws a TypeError naming the option. Types:
// sse-client.d.ts.
//
// Messages are kept deduplicated by id (the last 10000 ids received are remembered, across
// reconnects and clearMessages()), in id order, at most `maxMessages` of them (the oldest go
// first). An edit (`message_updated`) replaces the message with its id in place, a recall
// (`message_deleted`) removes it; a change of a message not held is reported to its callback
// and not added. A `reset` (the broker no longer has the changes after the resume point)
// clears nothing: the messages shown stay, `onReset` tells the app, which may refetch.
// State: `connected`, `messages`, `error` (an `SSEError`, an `Error`, or null),
// `reconnectAttempts` (consecutive failed attempts, 0 once connected), `lastEventId`, and
// `status`: "idle", "connecting", "connected", "reconnecting", "stalled" or "failed".
//
// Any other feed (`feed: "orders"`, `filters: { customer_id: "42", status: "open" }`: the
// stream /api/sse/orders?customer_id=42&status=open) has `rows` in place of `messages`: its
// rows keyed by primary key (`key`, "id" by default; an array for a composite key), kept by
// rows.js: insert and update put the row (an update out of the filters removes it), delete
// removes it, `reset` clears them and calls onReset, and `load(rows)` merges rows the app
// fetched. Handlers: onInsert(row, event), onUpdate(row, event), onDelete(row, event),
// onReset(event). Changes are deduplicated by position (the SSE id) and resume as messages do.

import { compareIds, createConnection, isResumable, SSEError } from "./connection.js";
import { createRows, passes } from "./rows.js";
import { joinShared } from "./shared.js";

export { compareIds, SSEError };

const DEFAULTS = {
  baseUrl: "",
  feed: null,
  filters: null,
  key: "id",
  sessionId: null,
  robotId: null,
  token: null,
  getToken: null,
  reconnectInterval: 3000,
  maxReconnectInterval: 30000,
  maxReconnectAttempts: Infinity,
  autoReconnect: true,
  maxMessages: 500,
  history: null,
  lastEventId: null,
  shared: true,
  stallTimeout: 5000,
  onMessage: null,
  onMessageUpdated: null,
  onMessageDeleted: null,
  onReset: null,
  onInsert: null,
  onUpdate: null,
  onDelete: null,
  onEvent: null,
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
  stalled: "Waiting for a connection…",
  failed: "Connection failed",
});

const SEEN_LIMIT = 10000;
const HISTORY_LIMIT = 1000; // the broker's bound on `history`
const SESSIONS_LIMIT = 100; // the broker's bound on `sessionId` repeated
const MESSAGES = "messages"; // the guide's feed: sessionId/robotId, `message` events
const FEED_NAME = /^[a-z0-9_-]{1,49}$/; // as the broker's configuration accepts
const RESERVED = new Set(["history", "lastEventId", "token"]); // not column filters
const CHANGES = new Set(["insert", "update", "delete"]);

// Checked at once, naming the option: a mistyped value would otherwise show up much later, as
// a client that reconnects in a tight loop or never at all.
function checkOptions(opts) {
  const fail = (name, what) => {
    const value = opts[name];
    const json = typeof value === "string" || (value !== null && typeof value === "object");
    const shown = json ? JSON.stringify(value) : String(value);
    throw new TypeError(`pgsse-client: ${name} must be ${what}, not ${shown}`);
  };
  for (const name of ["reconnectInterval", "maxReconnectInterval", "stallTimeout"]) {
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
  const { sessionId } = opts;
  if (Array.isArray(sessionId) && sessionId.length > SESSIONS_LIMIT) {
    fail("sessionId", `at most ${SESSIONS_LIMIT} sessions`);
  }
  const { feed, filters, key } = opts;
  if (feed !== null && !(typeof feed === "string" && FEED_NAME.test(feed))) {
    fail("feed", "a feed name (1 to 49 of a-z, 0-9, _ and -), or null for messages");
  }
  const generic = feed !== null && feed !== MESSAGES;
  if (filters !== null && (typeof filters !== "object" || Array.isArray(filters))) {
    fail("filters", "an object of column names and values, or null");
  }
  if (!generic && filters !== null && Object.keys(filters).length) {
    fail("filters", "empty for the messages feed (it takes sessionId and robotId)");
  }
  for (const [name, value] of Object.entries(filters || {})) {
    if (RESERVED.has(name) || name === "") {
      throw new TypeError(`pgsse-client: filters must name columns, not ${JSON.stringify(name)}`);
    }
    if (!(value == null || ["string", "number", "boolean"].includes(typeof value))) {
      throw new TypeError(`pgsse-client: filters.${name} must be a string, a number or a boolean`);
    }
  }
  for (const name of ["sessionId", "robotId"]) {
    if (generic && opts[name] != null && opts[name] !== "") {
      fail(name, `null for the feed ${JSON.stringify(feed)} (use filters)`);
    }
  }
  const keyOk = (name) => typeof name === "string" && name !== "";
  if (!(keyOk(key) || (Array.isArray(key) && key.length && key.every(keyOk)))) {
    fail("key", "a column name, or an array of them");
  }
}

/** A generic feed's stream: its name, and its filters as query parameters in column order
 * (one spelling, so that equal filters share a stream); null for the messages feed. */
function feedOf(opts) {
  if (opts.feed === null || opts.feed === MESSAGES) return null;
  const params = new URLSearchParams();
  const filters = Object.entries(opts.filters || {})
    .filter(([, value]) => value != null && value !== "")
    .map(([name, value]) => [name, String(value)])
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  for (const [name, value] of filters) params.set(name, value);
  const query = params.toString();
  return {
    name: opts.feed,
    filters: Object.fromEntries(filters),
    path: `/api/sse/${opts.feed}`,
    id: `${opts.feed}?${query}`,
  };
}

/** Adds `id` to a set of recent ids bounded by SEEN_LIMIT, the oldest going first. */
function remember(set, id) {
  set.add(id);
  if (set.size > SEEN_LIMIT) set.delete(set.values().next().value);
}

/** The client's sessions: null for every one, else distinct non-empty ids. */
function sessionsOf(sessionId) {
  const list = (Array.isArray(sessionId) ? sessionId : [sessionId])
    .filter((id) => id != null && id !== "")
    .map(String);
  return list.length ? [...new Set(list)] : null;
}

export function createSSEClient(options = {}) {
  const opts = { ...DEFAULTS };
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) opts[key] = value;
  }
  checkOptions(opts);
  const feed = feedOf(opts);
  const path = feed ? feed.path : `/api/sse/${MESSAGES}`;
  const store = feed ? createRows(opts.key) : null;
  const sessions = sessionsOf(opts.sessionId);
  const robotId = opts.robotId != null && opts.robotId !== "" ? String(opts.robotId) : null;

  let wanted = false; // connect() called and not disconnect()
  let lastEventId = isResumable(opts.lastEventId) ? String(opts.lastEventId) : null;
  let messages = [];
  const seen = new Set(); // positions received lately, so a replayed row is never shown twice
  const known = new Set(); // ids of the messages received lately: their changes concern us
  let state = snapshot({
    connected: false,
    ...(store ? { rows: store.rows } : { messages }),
    error: null,
    reconnectAttempts: 0,
    status: "idle",
  });
  const listeners = new Set();

  function snapshot(fields) {
    return Object.freeze({ ...fields, lastEventId });
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

  function query() {
    const params = new URLSearchParams(feed ? feed.filters : {});
    for (const session of sessions || []) params.append("sessionId", session);
    if (robotId !== null) params.set("robotId", robotId);
    // History only opens a stream that has nothing to resume from (the broker ignores it
    // beside a resume point anyway); later rows come by replay after the last one shown.
    if (lastEventId !== null) params.set("lastEventId", lastEventId);
    else if (opts.history !== null) params.set("history", String(opts.history));
    return params;
  }

  // The connection's state, or the shared one's, as this client's. `onConnected` comes with
  // the change to connected: on a shared stream already open, a client that joins gets no
  // `connected` event of its own, and is greeted all the same.
  let greeting = null; // the `connected` event that came with the change, if any
  function onState(next, reason) {
    if (!wanted && next.status !== "idle") return;
    const was = state.connected;
    update({
      connected: next.connected,
      error: next.error,
      reconnectAttempts: next.attempts,
      status: next.status,
    });
    if (was && !next.connected && reason) call("onDisconnected", reason);
    if (!was && next.connected) {
      call("onConnected", greeting || own({ type: "connected", message: "SSE connected",
                                             timestamp: new Date().toISOString() }));
    }
    greeting = null;
    if (next.error && next.status !== "stalled") call("onError", next.error);
  }

  // A `connected` event as this client's own stream would have said it (a shared stream
  // names every tab's sessions).
  function own(body) {
    if (feed) return body;
    const event = { ...body, sessionId: sessions ? sessions[0] : null, robotId };
    delete event.sessionIds;
    if (sessions && sessions.length > 1) event.sessionIds = sessions;
    return event;
  }

  function onEvent(body, event) {
    call("onEvent", body, event.lastEventId || null);
    if (body.type === "connected") greeting = own(body);
    else if (feed) onFeedEvent(body, event.lastEventId);
    else if (body.type === "message" && body.data) add(body.data, event.lastEventId);
    else if (body.type === "message_updated" && body.data) change(body, event.lastEventId);
    else if (body.type === "message_deleted" && body.data) change(body, event.lastEventId);
    else if (body.type === "reset") call("onReset", body);
  }

  function matches(message) {
    return (
      (sessions === null || sessions.includes(message.sessionId)) &&
      (robotId === null || message.robotId === robotId)
    );
  }

  // A position (SSE id) met for the first time: remembered as the resume point and among the
  // ids seen. The broker resumes after the last one received in its delivery (commit) order,
  // which is not always id order.
  function fresh(id) {
    if (!isResumable(id)) return false;
    lastEventId = id;
    if (seen.has(id)) return false;
    remember(seen, id);
    return true;
  }

  function add(message, sseId) {
    const id = String(message.id ?? sseId ?? "");
    if (!fresh(id)) return;
    remember(known, id);
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

  // An edit or a recall of a message (`message_updated`, `message_deleted`), once per
  // position. The message held with that id is replaced in place, or removed: recalled, or
  // edited out of this client's sessions/robot. A message not held is not added: it is older
  // than the messages shown (or was cleared, or trimmed by maxMessages), and showing it now
  // would put an old message among the new; the callback still reports it.
  function change(body, sseId) {
    const message = body.data;
    const id = String(message.id ?? "");
    if (sseId && !fresh(String(sseId))) return;
    const at = messages.findIndex((held) => held.id === id);
    const updated = body.type === "message_updated";
    if (at >= 0) {
      const next = messages.slice();
      if (updated && matches(message)) next[at] = message;
      else next.splice(at, 1);
      messages = next;
      update({ messages });
    } else {
      update({});
    }
    if (updated && matches(message)) remember(known, id);
    call(updated ? "onMessageUpdated" : "onMessageDeleted", message);
  }

  // A generic feed's event: the rows kept by primary key. An update that takes a row out of
  // this client's filters (`old` names a filter column whose new value no longer passes)
  // removes it: the broker sends an update to the filters of the old row too, so that they
  // see it leave. A `reset` clears the rows (what they were is unknown now) and asks the app,
  // through onReset, to fetch them again (`load`).
  function onFeedEvent(body, sseId) {
    if (body.type === "reset") {
      update({ rows: store.clear() });
      call("onReset", body);
      return;
    }
    if (!CHANGES.has(body.type) || body.feed !== feed.name || !body.data) return;
    if (sseId && !fresh(String(sseId))) return;
    const row = body.data;
    if (body.type === "delete" || (body.type === "update" && leaves(body))) store.remove(row);
    else store.put(row);
    update({ rows: store.rows });
    if (body.type === "insert") call("onInsert", row, body);
    else if (body.type === "update") call("onUpdate", row, body);
    else call("onDelete", row, body);
  }

  function leaves(body) {
    return Object.keys(body.old || {}).some(
      (column) => column in feed.filters && !passes(body.data[column], feed.filters[column]),
    );
  }

  // A stream of its own, or a place on the tabs' shared one.
  // A member of the shared stream resumes from its last id when it (re)joins: the leader
  // reopens the stream from there if the stream is past it (`after`, shared.js).
  const ownStream = !opts.shared || opts.history !== null;
  const member = {
    feed: feed && feed.id,
    sessions,
    robotId,
    matches,
    /** A change of this message concerns the client: it matches, or matched before. */
    concerns: (message) => matches(message) || known.has(String(message.id ?? "")),
    onEvent,
    onState,
    get after() {
      return lastEventId;
    },
  };
  let transport = null;
  function carrier() {
    if (transport === null) {
      transport =
        (!ownStream && joinShared(opts, member)) || createConnection(opts, { path, query, onEvent, onState });
    }
    return transport;
  }

  const client = {
    /** Open the stream (resuming after the last id seen). Resets the attempt count. */
    connect() {
      const wasConnected = state.connected;
      wanted = true;
      if (wasConnected) call("onDisconnected", "reconnecting");
      update({ error: null, reconnectAttempts: 0, connected: false, status: "connecting" });
      carrier().connect();
    },
    /** Close the stream and stop reconnecting; messages and the last id are kept. */
    disconnect() {
      wanted = false;
      const wasConnected = state.connected;
      if (transport !== null) transport.disconnect();
      update({ connected: false, reconnectAttempts: 0, error: null, status: "idle" });
      if (wasConnected) call("onDisconnected", "disconnected");
    },
    /** Forget the messages held; the stream still resumes after the last id seen, and a
     * row already received does not come back. */
    clearMessages() {
      messages = [];
      update(store ? {} : { messages });
    },
    /** A feed's rows fetched by the app (first, or after a reset), merged with the stream's:
     * a row the stream changed since the last reset keeps the stream's version. */
    load(rows) {
      if (!store) throw new TypeError("pgsse-client: load() is for a feed's rows");
      update({ rows: store.load(rows) });
    },
    /** Forget a feed's rows (the stream goes on). */
    clearRows() {
      if (store) update({ rows: store.clear() });
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
      return transport !== null && transport.reconnecting;
    },
    /** True while this client rides on the tabs' shared stream. */
    get shared() {
      return transport !== null && transport.shared === true;
    },
    get status() {
      return state.status;
    },
    get connected() {
      return state.connected;
    },
    get messages() {
      return state.messages;
    },
    get rows() {
      return state.rows;
    },
    /** The feed this client streams ("messages" for the guide's). */
    get feed() {
      return feed ? feed.name : MESSAGES;
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
    /** The stream URL the next connect of a stream of its own opens (without its token). */
    get url() {
      const params = query();
      const text = params.toString();
      return `${String(opts.baseUrl).replace(/\/+$/, "")}${path}${text ? `?${text}` : ""}`;
    },
  };
  return client;
}
