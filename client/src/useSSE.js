// useSSE: the React hook over sse-client.js.
//
// React is passed in, not imported: a bare `import "react"` only resolves through a bundler
// or an importmap, and a second copy of React breaks hooks. Taking the page's own React
// makes this file work unchanged from a <script type="module"> next to the UMD build
// (window.React), with an importmap, or in a bundled app. React 18 or later. In a bundled
// app, `import { useSSE } from "pgsse-client/react"` (react.js) has it bound already.
//
//   import { createUseSSE } from "/static/useSSE.js";
//   const useSSE = createUseSSE(React);
//   const { connected, messages, error, reconnectAttempts, connect, disconnect, clearMessages }
//     = useSSE({ sessionId: "123", robotId: "r1", onMessage: (m) => console.log(m) });
//
// Options: baseUrl, sessionId (one, or an array), robotId, token, getToken,
// reconnectInterval, maxReconnectInterval, maxReconnectAttempts, autoReconnect, maxMessages,
// history, shared, stallTimeout, onMessage, onMessageUpdated, onMessageDeleted, onReset,
// onEvent, onConnected, onDisconnected, onError (see sse-client.js), and `enabled` (default
// true: connect on mount). `messages` shows edits and recalls in place: a `message_updated`
// replaces the message with its id, a `message_deleted` removes it (sse-client.js says more). A change of baseUrl,
// sessionId (by value: a new array of the same ids is the same), robotId, a token string,
// history or a reconnect setting starts a new stream; new callbacks (and a new token or
// getToken function) do not. Unmounting closes it. The tabs of an origin share one connection
// (sse-client.js says how); `shared: false` gives the hook a stream of its own.

import { createSSEClient } from "./sse-client.js";

// The options that shape the stream: a change of any of them opens a new one.
// (And sessionId, compared by value.)
const STREAM_OPTIONS = [
  "baseUrl",
  "robotId",
  "reconnectInterval",
  "maxReconnectInterval",
  "maxReconnectAttempts",
  "autoReconnect",
  "maxMessages",
  "history",
  "shared",
  "stallTimeout",
];

// Every callback a client takes, read through a ref when called.
const CALLBACKS = [
  "onMessage",
  "onMessageUpdated",
  "onMessageDeleted",
  "onReset",
  "onInsert",
  "onUpdate",
  "onDelete",
  "onEvent",
  "onConnected",
  "onDisconnected",
  "onError",
];

// A dependency key for a session id or an array of them, equal for equal ids.
const sessionKey = (value) => (Array.isArray(value) ? `[${value.join("\u0000")}]` : value);

/** For the package's hooks (useSSE, useFeed): a client made again when `stream` changes (by
 * the values of `identity`), connected while mounted and `enabled`, and what both hooks
 * return of it (their own fields added). */
export function bindClient(React) {
  const { useEffect, useMemo, useRef, useSyncExternalStore } = React;

  return function useClient(options, stream, identity) {
    const { token = null, getToken = null, enabled = true } = options;

    // The latest callbacks, read when an event arrives, so passing inline arrow functions
    // does not reconnect on every render.
    const callbacks = useRef(options);
    callbacks.current = options;

    const client = useMemo(
      () =>
        createSSEClient({
          ...stream,
          // Token functions are read through the ref: a new one need not reconnect.
          token: typeof token === "function" ? () => callbacks.current.token() : token,
          getToken: typeof getToken === "function" ? () => callbacks.current.getToken() : null,
          ...Object.fromEntries(
            CALLBACKS.map((name) => [name, (...args) => callbacks.current[name]?.(...args)]),
          ),
        }),
      [...identity, typeof token === "function" ? "function" : token, !getToken],
    );

    useEffect(() => {
      if (enabled) client.connect();
      return () => client.disconnect();
    }, [client, enabled]);

    const state = useSyncExternalStore(client.subscribe, client.getSnapshot, client.getSnapshot);
    const result = {
      connected: state.connected,
      error: state.error,
      reconnectAttempts: state.reconnectAttempts,
      // Beyond the seed's values: "idle", "connecting", "connected", "reconnecting",
      // "stalled" (no answer yet: see the per-host connection limit), "failed".
      status: state.status,
      lastEventId: state.lastEventId,
      connect: client.connect,
      disconnect: client.disconnect,
    };
    return { client, state, result };
  };
}

export function createUseSSE(React) {
  const useClient = bindClient(React);

  return function useSSE(options = {}) {
    const settings = STREAM_OPTIONS.map((name) => options[name]);
    const stream = Object.fromEntries(STREAM_OPTIONS.map((name, at) => [name, settings[at]]));
    stream.sessionId = options.sessionId;
    // sessionId by value: a new array of the same ids keeps the stream
    const identity = [...settings, sessionKey(options.sessionId)];
    const { client, state, result } = useClient(options, stream, identity);
    return { ...result, messages: state.messages, clearMessages: client.clearMessages };
  };
}
