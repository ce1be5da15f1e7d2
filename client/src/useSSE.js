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

// A dependency key for a session id or an array of them, equal for equal ids.
const sessionKey = (value) => (Array.isArray(value) ? `[${value.join("\u0000")}]` : value);

export function createUseSSE(React) {
  const { useEffect, useMemo, useRef, useSyncExternalStore } = React;

  return function useSSE(options = {}) {
    const { token = null, getToken = null, enabled = true } = options;
    const settings = STREAM_OPTIONS.map((name) => options[name]);
    const sessionIds = options.sessionId;
    const sessions = sessionKey(sessionIds);

    // The latest callbacks, read when an event arrives, so passing inline arrow functions
    // does not reconnect on every render.
    const callbacks = useRef(options);
    callbacks.current = options;

    const client = useMemo(
      () =>
        createSSEClient({
          ...Object.fromEntries(STREAM_OPTIONS.map((name, at) => [name, settings[at]])),
          sessionId: sessionIds,
          // Token functions are read through the ref: a new one need not reconnect.
          token: typeof token === "function" ? () => callbacks.current.token() : token,
          getToken: typeof getToken === "function" ? () => callbacks.current.getToken() : null,
          onMessage: (message) => callbacks.current.onMessage?.(message),
          onMessageUpdated: (message) => callbacks.current.onMessageUpdated?.(message),
          onMessageDeleted: (message) => callbacks.current.onMessageDeleted?.(message),
          onReset: (event) => callbacks.current.onReset?.(event),
          onEvent: (event, id) => callbacks.current.onEvent?.(event, id),
          onConnected: (event) => callbacks.current.onConnected?.(event),
          onDisconnected: (reason) => callbacks.current.onDisconnected?.(reason),
          onError: (error) => callbacks.current.onError?.(error),
        }),
      // sessionId by value (`sessions`): a new array of the same ids keeps the stream
      [...settings, sessions, typeof token === "function" ? "function" : token, !getToken],
    );

    useEffect(() => {
      if (enabled) client.connect();
      return () => client.disconnect();
    }, [client, enabled]);

    const state = useSyncExternalStore(client.subscribe, client.getSnapshot, client.getSnapshot);

    return {
      connected: state.connected,
      messages: state.messages,
      error: state.error,
      reconnectAttempts: state.reconnectAttempts,
      // Beyond the seed's values: "idle", "connecting", "connected", "reconnecting",
      // "stalled" (no answer yet: see the per-host connection limit), "failed".
      status: state.status,
      lastEventId: state.lastEventId,
      connect: client.connect,
      disconnect: client.disconnect,
      clearMessages: client.clearMessages,
    };
  };
}
