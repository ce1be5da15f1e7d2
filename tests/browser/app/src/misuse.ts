// What the declarations must refuse: if a type were `any`, an `@ts-expect-error` below would
// have no error to expect, and tsc fails on it.
import { createSSEClient, type Message } from 'pgsse-client';
import { MessageStream, useFeed, useSSE } from 'pgsse-client/react';

interface Order {
  id: number;
  status: string;
}

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

// @ts-expect-error: a deleted message's data has no content
createSSEClient({ onMessageDeleted: (gone) => gone.content });
// @ts-expect-error: sessionId is the messages feed's; other feeds take filters
createSSEClient({ feed: 'orders', sessionId: '42' });
// @ts-expect-error: a filter names a column of the row
createSSEClient<Order>({ feed: 'orders', filters: { customer: '42' } });
// @ts-expect-error: the key is a column of the row
createSSEClient<Order>({ feed: 'orders', key: 'uuid' });
// @ts-expect-error: a filter is one value, equality only
createSSEClient({ feed: 'orders', filters: { status: ['open', 'paid'] } });

export function useFeedMisuse(order: Order): void {
  // @ts-expect-error: useFeed needs a feed
  useFeed<Order>({ filters: { status: 'open' } });
  const { rows, load } = useFeed<Order>({ feed: 'orders' });
  // @ts-expect-error: rows belong to the client, read-only
  rows.push(order);
  // @ts-expect-error: load takes rows
  load(order);
  // @ts-expect-error: a feed client has no messages
  void createSSEClient({ feed: 'orders' }).messages;
}

// And what they must accept: the browser's own EventSource as the replacement constructor.
createSSEClient({ EventSource, token: () => undefined, maxReconnectAttempts: Infinity });
