// useFeed: a feed's rows, live, as React state (over sse-client.js, like useSSE.js; React is
// passed in for the same reason; `import { useFeed } from "pgsse-client/react"` has it bound).
//
//   const useFeed = createUseFeed(React);
//   const { rows, connected, error, load } = useFeed({
//     feed: "orders", filters: { customer_id: "42", status: "open" }, key: "id",
//     onReset: () => fetchOrders().then(load),
//   });
//
// `rows` are the feed's rows keyed by primary key (`key`, "id" by default; an array of
// columns for a composite key), in order of first arrival: an insert or an update puts the
// row under its key, in place; an update that takes the row out of `filters` and a delete
// remove it. A `reset` (the broker no longer holds the changes after the resume point) clears
// `rows` and calls `onReset`: the app fetches the rows again and hands them to `load(rows)`,
// which keeps the stream's version of any row it changed meanwhile (rows.js), so the fetch
// may run while changes arrive. The same goes for the first rows: fetch them once
// `onConnected` has been called, then `load` them.
//
// Options: feed (required), filters, key, baseUrl, token, getToken, reconnectInterval,
// maxReconnectInterval, maxReconnectAttempts, autoReconnect, history, shared, stallTimeout,
// onInsert(row, event), onUpdate(row, event), onDelete(row, event), onReset(event), onEvent,
// onConnected, onDisconnected, onError, enabled. A change of feed, filters or key (by value),
// baseUrl, a token string, history or a reconnect setting opens a new stream (with no rows);
// new callbacks do not. The tabs of an origin share one stream per feed and filters.

import { bindClient } from "./useSSE.js";

const STREAM_OPTIONS = [
  "baseUrl",
  "reconnectInterval",
  "maxReconnectInterval",
  "maxReconnectAttempts",
  "autoReconnect",
  "history",
  "shared",
  "stallTimeout",
];

// A dependency key for filters or a key, equal for equal values whatever the object.
function valueKey(value) {
  if (value === null || typeof value !== "object") return value;
  const entries = Array.isArray(value) ? value : Object.entries(value).sort(([a], [b]) => (a < b ? -1 : 1));
  return JSON.stringify(entries);
}

export function createUseFeed(React) {
  const useClient = bindClient(React);

  return function useFeed(options) {
    const { feed, filters = null, key = "id" } = options;
    if (typeof feed !== "string" || feed === "messages") {
      throw new TypeError("pgsse-client: useFeed needs `feed`, a feed's name (messages: useSSE)");
    }
    const settings = STREAM_OPTIONS.map((name) => options[name]);
    const stream = Object.fromEntries(STREAM_OPTIONS.map((name, at) => [name, settings[at]]));
    Object.assign(stream, { feed, filters, key });
    const identity = [...settings, feed, valueKey(filters), valueKey(key)];
    const { client, state, result } = useClient(options, stream, identity);
    return { ...result, rows: state.rows, load: client.load, clearRows: client.clearRows };
  };
}
