// Types of useFeed.js: the hook for any feed, for React passed in (no build step).
import type * as React from "react";
import type { FeedClientOptions, FeedRow } from "./sse-client.js";
import type { UseStreamResult } from "./useSSE.js";

export interface UseFeedOptions<Row extends object = FeedRow>
  extends Omit<FeedClientOptions<Row>, "EventSource" | "lastEventId"> {
  /** `false` waits (e.g. until the filter's value is known); true by default. */
  enabled?: boolean;
}

export interface UseFeedResult<Row extends object = FeedRow> extends UseStreamResult {
  /** Keyed by primary key, in order of first arrival; cleared by a `reset`. */
  rows: readonly Row[];
  /** Rows the app fetched, merged: a row the stream changed since the last reset keeps the
   * stream's version. */
  load: (rows: readonly Row[]) => void;
  clearRows: () => void;
}

export type UseFeed = <Row extends object = FeedRow>(
  options: UseFeedOptions<Row>,
) => UseFeedResult<Row>;

export function createUseFeed(react: typeof React): UseFeed;
