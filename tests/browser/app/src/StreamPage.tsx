// The guide's component example, as written. No 'use client' here: pgsse-client/react marks
// itself as client code, so a Next.js server component may render it.
import { MessageStream } from 'pgsse-client/react';

export default function StreamPage() {
  return <MessageStream sessionId="chat-session-123" onNewMessage={(m) => console.log(m)} />;
}
