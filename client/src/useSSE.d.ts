// Types of useSSE.js: the hook, for React passed in (no build step).
import type * as React from "react";
import type { Message, SSEClientOptions, SSEError, Status } from "./sse-client.js";

export interface UseSSEOptions extends Omit<SSEClientOptions, "EventSource" | "lastEventId"> {
  /** `false` waits (e.g. until the session id is known); true by default. */
  enabled?: boolean;
}

/** What the hooks (useSSE, useFeed) return of their stream. */
export interface UseStreamResult {
  connected: boolean;
  /** What went wrong last (`error.message`), null while all is well. */
  error: SSEError | null;
  reconnectAttempts: number;
  status: Status;
  lastEventId: string | null;
  connect: () => void;
  disconnect: () => void;
}

export interface UseSSEResult extends UseStreamResult {
  messages: readonly Message[];
  clearMessages: () => void;
}

export type UseSSE = (options?: UseSSEOptions) => UseSSEResult;

export function createUseSSE(react: typeof React): UseSSE;
