// What the declarations must accept for edits, recalls and feeds (no JSX: type checks only;
// misuse.ts holds what they must refuse).
import {
  createSSEClient,
  type DeletedMessage,
  type FeedChange,
  type FeedClient,
  type Message,
  type ResetEvent,
  type SSEClient,
} from 'pgsse-client';
import { useFeed, useSSE, type UseFeedResult } from 'pgsse-client/react';

interface Order {
  id: number;
  customer_id: string;
  status: 'open' | 'closed';
  total: number;
}

// The messages feed, by default or by name, with the change callbacks.
const chat: SSEClient = createSSEClient({
  sessionId: 's',
  onMessageUpdated: (message: Message) => void message.content.length,
  onMessageDeleted: (gone: DeletedMessage) => void gone.sessionId.length,
  onReset: (event: ResetEvent) => void event.reason.length,
});
createSSEClient({ feed: 'messages', sessionId: 's' });
void chat.messages;

// Any other feed: rows typed by the app's row type, filters by its columns.
const orders: FeedClient<Order> = createSSEClient<Order>({
  feed: 'orders',
  filters: { customer_id: '42', status: 'open' },
  key: 'id',
  onInsert: (row: Order, event: FeedChange<Order>) => void [row.total, event.feed],
  onUpdate: (row, event) => void [row.status, event.old?.status],
  onDelete: (row) => void row.id,
  onReset: () => orders.clearRows(),
});
const totals: number[] = orders.rows.map((order) => order.total);
orders.load([{ id: 1, customer_id: '42', status: 'open', total: 10 }]);
orders.subscribe((state) => void state.rows.length);
void totals;

// Untyped rows, a composite key, numbers and booleans as filter values.
const lines = createSSEClient({ feed: 'order-lines', filters: { order_id: 7, shipped: false },
                                key: ['order_id', 'line'] });
void lines.rows[0]?.['line'];

export function useOrders(customer: string): UseFeedResult<Order> {
  const { messages } = useSSE({ sessionId: customer, onMessageUpdated: (m) => void m.id,
                                onReset: (event) => void event.type });
  void messages;
  const result = useFeed<Order>({
    feed: 'orders',
    filters: { customer_id: customer },
    onReset: () => void fetch(`/orders?customer=${customer}`)
      .then((answer) => answer.json() as Promise<Order[]>)
      .then(result.load),
  });
  const open: readonly Order[] = result.rows.filter((order) => order.status === 'open');
  void open;
  return result;
}
