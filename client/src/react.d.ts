// Types of react.js (`import ... from "pgsse-client/react"`).
import type { MessageStreamComponent } from "./MessageStream.js";
import type { UseFeed } from "./useFeed.js";
import type { UseSSE } from "./useSSE.js";

export { createMessageStream } from "./MessageStream.js";
export type { MessageStreamComponent, MessageStreamProps } from "./MessageStream.js";
export type {
  ConnectedEvent,
  DeletedMessage,
  FeedChange,
  FeedRow,
  FilterValue,
  Message,
  ResetEvent,
  SSEClientOptions,
  SSEError,
  SSEState,
  Status,
  StreamEvent,
} from "./sse-client.js";
export { createUseFeed } from "./useFeed.js";
export type { UseFeed, UseFeedOptions, UseFeedResult } from "./useFeed.js";
export { createUseSSE } from "./useSSE.js";
export type { UseSSE, UseSSEOptions, UseSSEResult, UseStreamResult } from "./useSSE.js";

/** The hook: connects on mount, closes on unmount, resumes from the last id on reconnect. */
export const useSSE: UseSSE;
/** A session's messages, live: a status line, Connect/Disconnect/Clear, an aria-live list. */
export const MessageStream: MessageStreamComponent;
/** A feed's rows, live, keyed by primary key: `useFeed({ feed: "orders", filters })`. */
export const useFeed: UseFeed;
