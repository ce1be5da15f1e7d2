// The root layout every Next.js app has; the pages come from the README (tests/system/test_next.py
// writes them into app/ before each build, as a reader pastes them).
import type { ReactNode } from 'react';

export default function RootLayout({ children }: { children: ReactNode }) {
  return (
    <html lang="en">
      <body>{children}</body>
    </html>
  );
}
