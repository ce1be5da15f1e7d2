// One EventSource kept open: reconnects with backoff, stall detection, token renewal and
// prompt retries. Used by sse-client.js, for a client's own stream and for the one stream a
// leader tab holds for every tab of its origin (shared.js). Not an entry point of the package.
//
// Why not rely on EventSource's own reconnect: it gives up for good on an HTTP error (the
// broker's 503 at its connection cap, a 502 from a proxy) and after such a failure nobody
// resumes. So on every failure the EventSource is closed here and a new one opened after a
// delay, up to `maxReconnectAttempts` consecutive failures; `query()` gives each new stream its
// resume point. Delays: the first retry within FIRST_RETRY_MS (a broker restart or a blip is
// over by then), then `reconnectInterval` doubling up to `maxReconnectInterval`, each a random
// time in [d/2, d] ("equal jitter") so that clients dropped together do not return together.
// A pending retry runs at once when the browser comes back `online` or a hidden tab becomes
// visible: after an outage the page catches up when the network does, not at the next step of
// its backoff. An attempt that neither opens nor fails within `stallTimeout` ms is reported as
// stalled: over HTTP/1.1 a browser opens at most 6 connections per host, and a 7th stream
// waits, silently, until one closes.

export const FIRST_RETRY_MS = 500;
const RESUMABLE = /^[0-9]{1,19}$/;

/** The error the client reports: `message` says what happened and what the client does. */
export class SSEError extends Error {
  constructor(message, reason = message) {
    super(message);
    this.name = "SSEError";
    /** What went wrong, without the "reconnecting (attempt n)" part. */
    this.reason = reason;
  }
}

export const STALLED_HINT =
  "no answer yet: the browser may be holding this stream back, as it opens at most 6" +
  " connections per host over HTTP/1.1 (other tabs' streams count); share one connection" +
  " (shared: true) or serve the broker over HTTP/2";

function orNothing(handler) {
  return typeof handler === "function" ? handler : () => {};
}

/** The token for the next connect: `getToken()` (may return a promise), else `token` (a
 * string, or a function as before). */
function nextToken(opts) {
  if (typeof opts.getToken === "function") return opts.getToken();
  return typeof opts.token === "function" ? opts.token() : opts.token;
}

// hooks: path (`/api/sse/<feed>`), query() -> URLSearchParams of the stream (its resume point
// included), onEvent(body, event) for every parsed event, onState({ connected, attempts,
// error, status }, reason) on every change of the connection's state.
export function createConnection(opts, hooks) {
  const EventSourceImpl = opts.EventSource || globalThis.EventSource;
  const onEvent = orNothing(hooks.onEvent);
  const onState = orNothing(hooks.onState);
  let source = null;
  let timer = null;
  let stallTimer = null;
  let wanted = false;
  let connected = false;
  let attempts = 0;
  let generation = 0; // a token awaited for an older attempt is dropped

  function report(status, error, reason) {
    onState({ connected, attempts, error, status }, reason);
  }

  function streamUrl(token) {
    const params = hooks.query();
    // EventSource cannot send an Authorization header.
    if (token) params.set("token", token);
    const query = params.toString();
    return `${String(opts.baseUrl).replace(/\/+$/, "")}${hooks.path}${query ? `?${query}` : ""}`;
  }

  // A token that is a promise is awaited; any other is used at once, so that a client with
  // a plain token opens its EventSource within connect().
  function open() {
    timer = null;
    const attempt = ++generation;
    const current = () => attempt === generation && wanted;
    const noToken = (error) => {
      if (current()) lost(`could not get a token: ${error?.message ?? error}`);
    };
    let token;
    try {
      token = nextToken(opts);
    } catch (error) {
      noToken(error);
      return;
    }
    if (token && typeof token.then === "function") {
      token.then((value) => current() && start(value), noToken);
    } else {
      start(token);
    }
  }

  function start(token) {
    const es = new EventSourceImpl(streamUrl(token));
    let opened = false;
    source = es;
    if (opts.stallTimeout > 0) {
      stallTimer = setTimeout(() => {
        stallTimer = null;
        if (source === es && !connected) report("stalled", new SSEError(STALLED_HINT, "stalled"));
      }, opts.stallTimeout);
    }
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
    generation += 1;
    if (source) {
      source.onopen = null;
      source.onmessage = null;
      source.onerror = null;
      source.close();
      source = null;
    }
    for (const pending of [timer, stallTimer]) if (pending !== null) clearTimeout(pending);
    timer = null;
    stallTimer = null;
  }

  function receive(event) {
    let body;
    try {
      body = JSON.parse(event.data);
    } catch {
      return; // not ours; the broker only sends JSON objects
    }
    if (!body || typeof body !== "object") return;
    if (body.type === "connected") {
      if (stallTimer !== null) clearTimeout(stallTimer);
      stallTimer = null;
      connected = true;
      attempts = 0;
    }
    onEvent(body, event); // first: the state change below reports this `connected` event
    if (body.type === "connected") report("connected", null);
    if (body.type === "error") {
      // The broker ends this stream on purpose; resume from the last id on a new one, at once
      // when it says how (a new token, the rest of a long replay).
      const reason = String(body.error || "stream closed by the server");
      lost(reason, /^(replay limit|token expired)/.test(reason));
    }
  }

  function lost(reason, immediately = false) {
    const wasConnected = connected;
    close();
    connected = false;
    if (!wanted) return;
    const max = opts.maxReconnectAttempts;
    let error;
    let status = "reconnecting";
    if (opts.autoReconnect && attempts + 1 <= max) {
      attempts += 1;
      timer = setTimeout(open, immediately && attempts === 1 ? 0 : delay(attempts));
      const of = max === Infinity ? "" : ` of ${max}`;
      error = new SSEError(`${reason}: reconnecting (attempt ${attempts}${of})`, reason);
    } else {
      wanted = false;
      status = "failed";
      const text = opts.autoReconnect ? `${reason}: gave up after ${max} reconnect attempts` : reason;
      error = new SSEError(text, reason);
    }
    report(status, error, wasConnected ? reason : null);
    unwatch(!wanted);
  }

  function delay(attempt) {
    // The exponent is bounded: with no limit on attempts 2 ** attempt would reach Infinity,
    // and 0 * Infinity is NaN (a retry loop with no delay at all).
    const base =
      attempt === 1
        ? Math.min(FIRST_RETRY_MS, opts.reconnectInterval)
        : Math.min(opts.reconnectInterval * 2 ** Math.min(attempt - 2, 30), opts.maxReconnectInterval);
    return base / 2 + Math.random() * (base / 2);
  }

  // A pending retry runs now when the network or the tab comes back.
  function retryNow() {
    if (!wanted || timer === null) return;
    clearTimeout(timer);
    open();
  }
  function onVisible() {
    if (globalThis.document?.visibilityState === "visible") retryNow();
  }
  let watching = false;
  function watch() {
    if (watching || typeof globalThis.addEventListener !== "function") return;
    watching = true;
    globalThis.addEventListener("online", retryNow);
    globalThis.document?.addEventListener("visibilitychange", onVisible);
  }
  function unwatch(stop) {
    if (!stop || !watching) return;
    watching = false;
    globalThis.removeEventListener("online", retryNow);
    globalThis.document?.removeEventListener("visibilitychange", onVisible);
  }

  return {
    connect() {
      wanted = true;
      close();
      connected = false;
      attempts = 0;
      watch();
      report("connecting", null);
      open();
    },
    disconnect() {
      wanted = false;
      close();
      const wasConnected = connected;
      connected = false;
      attempts = 0;
      unwatch(true);
      report("idle", null, wasConnected ? "disconnected" : null);
    },
    /** A pending retry, now (the network or the tab came back). */
    retryNow,
    get reconnecting() {
      return timer !== null;
    },
  };
}

// Row ids are decimal strings of up to 19 digits, beyond a double's exact range: compare them
// as strings (a longer canonical decimal is larger).
export function compareIds(a, b) {
  const x = String(a);
  const y = String(b);
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

export function isResumable(id) {
  return RESUMABLE.test(String(id ?? ""));
}
