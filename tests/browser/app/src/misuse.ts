// What the declarations must refuse: if a type were `any`, an `@ts-expect-error` below would
// have no error to expect, and tsc fails on it.
import { createSSEClient, type Message } from 'pgsse-client';
import { MessageStream, useSSE } from 'pgsse-client/react';

// @ts-expect-error: sessionId is a string
createSSEClient({ sessionId: 123 });
// @ts-expect-error: no such option
createSSEClient({ reconnectIntervall: 5000 });
// @ts-expect-error: onError receives an Error (SSEError), not an Event
createSSEClient({ onError: (event: Event) => event.preventDefault() });

export function useMisuse(message: Message): void {
  // @ts-expect-error: content is a string
  const length: number = message.content;
  // @ts-expect-error: no such field
  void message.text;
  const { messages, status } = useSSE({ maxReconnectAttempts: Infinity, history: 50 });
  // @ts-expect-error: messages belong to the client, read-only
  messages.push(message);
  // @ts-expect-error: not a status the client has
  if (status === 'open') void length;
  // @ts-expect-error: onNewMessage takes a function
  void MessageStream({ sessionId: 's', onNewMessage: 'log' });
}

// And what they must accept: the browser's own EventSource as the replacement constructor.
createSSEClient({ EventSource, token: () => undefined, maxReconnectAttempts: Infinity });
