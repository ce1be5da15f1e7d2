// useSSE: the React hook over sse-client.js.
//
// React is passed in, not imported: a bare `import "react"` only resolves through a bundler
// or an importmap, and a second copy of React breaks hooks. Taking the page's own React
// makes this file work unchanged from a <script type="module"> next to the UMD build
// (window.React), with an importmap, or in a bundled app. React 18 or later.
//
//   import { createUseSSE } from "/static/useSSE.js";
//   const useSSE = createUseSSE(React);
//   const { connected, messages, error, reconnectAttempts, connect, disconnect, clearMessages }
//     = useSSE({ sessionId: "123", robotId: "r1", onMessage: (m) => console.log(m) });
//
// Options: baseUrl, sessionId, robotId, token, reconnectInterval, maxReconnectInterval,
// maxReconnectAttempts, autoReconnect, maxMessages, onMessage, onConnected, onDisconnected,
// onError (see sse-client.js), and `enabled` (default true: connect on mount). A change of
// baseUrl, sessionId, robotId, a token string or a reconnect setting starts a new stream; new
// callbacks (and a new token function) do not. Unmounting closes the stream.

import { createSSEClient } from "./sse-client.js";

export function createUseSSE(React) {
  const { useEffect, useMemo, useRef, useSyncExternalStore } = React;

  return function useSSE(options = {}) {
    const {
      baseUrl = "",
      sessionId = null,
      robotId = null,
      token = null,
      reconnectInterval,
      maxReconnectInterval,
      maxReconnectAttempts,
      autoReconnect,
      maxMessages,
      enabled = true,
    } = options;

    // The latest callbacks, read when an event arrives, so passing inline arrow functions
    // does not reconnect on every render.
    const callbacks = useRef(options);
    callbacks.current = options;

    const client = useMemo(
      () =>
        createSSEClient({
          baseUrl,
          sessionId,
          robotId,
          // A token function is read through the ref: a new one need not reconnect.
          token: typeof token === "function" ? () => callbacks.current.token() : token,
          reconnectInterval,
          maxReconnectInterval,
          maxReconnectAttempts,
          autoReconnect,
          maxMessages,
          onMessage: (message) => callbacks.current.onMessage?.(message),
          onConnected: (event) => callbacks.current.onConnected?.(event),
          onDisconnected: (reason) => callbacks.current.onDisconnected?.(reason),
          onError: (error) => callbacks.current.onError?.(error),
        }),
      [
        baseUrl,
        sessionId,
        robotId,
        typeof token === "function" ? "function" : token,
        reconnectInterval,
        maxReconnectInterval,
        maxReconnectAttempts,
        autoReconnect,
        maxMessages,
      ],
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
      // Beyond the seed's values: "idle", "connecting", "connected", "reconnecting", "failed".
      status: state.status,
      lastEventId: state.lastEventId,
      connect: client.connect,
      disconnect: client.disconnect,
      clearMessages: client.clearMessages,
    };
  };
}
