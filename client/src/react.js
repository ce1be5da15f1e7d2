"use client";
// pgsse-client/react: useSSE, MessageStream and useFeed bound to the app's own React, for
// bundled apps (Next.js, Vite). The directive marks this entry as client code for Next.js's
// App Router, so a server component may render <MessageStream> itself.
//
//   import { useSSE, MessageStream, useFeed } from "pgsse-client/react";
//
// The files stay React-agnostic (they take React as an argument) so that the very same files
// serve pages with no build step from the broker's /static/; this is the only module that
// imports "react" by name.

import * as React from "react";
import { createMessageStream } from "./MessageStream.js";
import { createUseFeed } from "./useFeed.js";
import { createUseSSE } from "./useSSE.js";

export { createMessageStream, createUseFeed, createUseSSE };
export const useSSE = createUseSSE(React);
export const MessageStream = createMessageStream(React);
export const useFeed = createUseFeed(React);
