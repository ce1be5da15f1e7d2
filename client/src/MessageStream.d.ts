// Types of MessageStream.js: the component, for React passed in (no build step).
import type * as React from "react";
import type { Message } from "./sse-client.js";
import type { UseSSEOptions } from "./useSSE.js";

export interface MessageStreamProps extends UseSSEOptions {
  /** Called once per new message, as `onMessage` is. */
  onNewMessage?: (message: Message) => void;
  /** The heading and the section's label ("Messages"). */
  title?: string;
  className?: string;
  /** Connect/Disconnect and Clear buttons (true). */
  showControls?: boolean;
  /** Replaces the default rendering of one message's body. */
  renderMessage?: (message: Message) => React.ReactNode;
}

export type MessageStreamComponent = (props: MessageStreamProps) => React.ReactElement;

export function createMessageStream(react: typeof React): MessageStreamComponent;
