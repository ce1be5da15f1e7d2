'use client';
// The guide's chat page, as its readers write it: the hook with every option the guide shows.
import { useState } from 'react';
import { useSSE } from 'pgsse-client/react';
import type { ConnectedEvent, Message } from 'pgsse-client';

export default function ChatPage({ sessionId, robotId }: { sessionId: string; robotId?: string }) {
  const [events, setEvents] = useState<string[]>([]);
  const note = (line: string) => setEvents((lines) => [...lines, line]);
  const onMessage = (message: Message) => note(`message ${message.id}`);
  const onConnected = (event: ConnectedEvent) => note(`connected ${event.sessionId}`);
  const onDisconnected = (reason: string) => note(`disconnected: ${reason}`);
  const onError = (error: Error) => note(`error: ${error.message}`);

  const { connected, messages, error, reconnectAttempts, status, connect, disconnect,
          clearMessages } =
    useSSE({ sessionId, robotId, reconnectInterval: 5000, maxReconnectAttempts: 20,
             onMessage, onConnected, onDisconnected, onError });

  return (
    <section id="chat">
      <p id="chat-status" data-status={status}>
        {connected ? 'connected' : 'disconnected'}
        {reconnectAttempts > 0 && ` (attempt ${reconnectAttempts})`}
      </p>
      {error && <p id="chat-error">错误: {error.message}</p>}
      <button id="chat-connect" onClick={connected ? disconnect : connect}>
        {connected ? 'Disconnect' : 'Connect'}
      </button>
      <button id="chat-clear" onClick={clearMessages}>Clear</button>
      <ul id="chat-messages">
        {messages.map((m) => (
          <li key={m.id} data-id={m.id} className={m.isFromBot ? 'bot' : 'human'}>
            {m.content}
          </li>
        ))}
      </ul>
      <ol id="chat-events">
        {events.map((line, n) => <li key={n}>{line}</li>)}
      </ol>
    </section>
  );
}
