// The app's entry, bundled by esbuild: both pages, the chat on the session in the URL.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import ChatPage from './ChatPage';
import StreamPage from './StreamPage';

const sessionId = new URLSearchParams(location.search).get('sessionId') ?? 'chat-session-123';
const root = document.getElementById('root');
if (root === null) throw new Error('no #root element');
createRoot(root).render(
  <StrictMode>
    <ChatPage sessionId={sessionId} />
    <StreamPage />
  </StrictMode>,
);
