// Types of sse-client.js, the framework-free client (`import ... from "pgsse-client"`).

/** One row of `messages`, as the broker sends it: the `data` of a `message` event. */
export interface Message {
  /** The row id as a decimal string (up to 19 digits: beyond a number's exact range). */
  id: string;
  sessionId: string;
  robotId: string | null;
  content: string;
  isFromBot: boolean;
  isHuman: boolean;
  intent: string | null;
  /** UTC with milliseconds, `2026-01-01T00:00:00.000Z`. */
  createdAt: string;
  /** Present (true) only on a row over the broker's `BROKER_MAX_ROW_BYTES`: `content` is then
   * its first bytes, and the whole row stays in the table. */
  truncated?: true;
  /** The stored content's full size in bytes, with `truncated`. */
  contentBytes?: number;
}

/** The `data` of a `message_deleted` event: which message was recalled. */
export interface DeletedMessage {
  id: string;
  sessionId: string;
  robotId: string | null;
}

/** Sent when the broker no longer holds the changes after the client's resume point (they are
 * kept `BROKER_RETENTION`): what the client shows may be stale, so the app refetches. Live
 * events follow. */
export interface ResetEvent {
  type: "reset";
  reason: string;
  [field: string]: unknown;
}

/** The first event of every stream. */
export interface ConnectedEvent {
  type: "connected";
  message: string;
  timestamp: string;
  /** The first of the client's sessions, null for every session. */
  sessionId: string | null;
  /** Every session, for a client of several. */
  sessionIds?: string[];
  robotId: string | null;
}

/** Any event of the stream, as delivered: `connected`, `message`, `heartbeat`, `error`, or a
 * type this client does not know yet. */
export interface StreamEvent {
  type: string;
  [field: string]: unknown;
}

/** What the client reports in `error` and passes to `onError`. */
export class SSEError extends Error {
  constructor(message: string, reason?: string);
  name: "SSEError";
  /** What went wrong, without the "reconnecting (attempt n)" part. */
  reason: string;
}

/**
 * `stalled`: an attempt has had no answer for `stallTimeout` ms (the browser may be holding
 * it back: at most 6 connections per host over HTTP/1.1); `failed`: reconnect attempts
 * exhausted, `connect()` starts again.
 */
export type Status = "idle" | "connecting" | "connected" | "reconnecting" | "stalled" | "failed";

/** What the client needs of an `EventSource` (the `EventSource` option takes a replacement). */
export interface EventSourceLike {
  onopen: ((event: Event) => void) | null;
  onmessage: ((event: MessageEvent<string>) => void) | null;
  onerror: ((event: Event) => void) | null;
  close(): void;
}

export interface SSEClientOptions {
  /** Where the broker is; `""` (the default) is the page's own origin. */
  baseUrl?: string;
  /** The guide's feed (the default); any other takes `FeedClientOptions`. */
  feed?: "messages" | null;
  /** The stream's filter: one session, several (at most 100), or none (`null`,
   * `undefined`, `""`): the global stream. */
  sessionId?: string | readonly string[] | null;
  robotId?: string | null;
  /** For a broker with `BROKER_AUTH_SECRET`; a function is called at every (re)connect. */
  token?: string | (() => string | null | undefined) | null;
  /** Called before each connect and when the stream ends with "token expired": the token
   * (or a promise of it). Takes precedence over `token`. */
  getToken?: (() => string | null | undefined | Promise<string | null | undefined>) | null;
  /** Share one connection among the tabs of this origin (true); `false`: a stream of its own.
   * A client with `history` or `lastEventId` always has one of its own. */
  shared?: boolean;
  /** ms without an answer before the status is `stalled` (5000); 0: never. */
  stallTimeout?: number;
  /** ms of backoff (3000): the first retry comes within 0.5 s, the second after this,
   * doubling on each failed attempt after. */
  reconnectInterval?: number;
  /** ms, the cap of that backoff (30000). */
  maxReconnectInterval?: number;
  /** Consecutive failed attempts before giving up; `Infinity` (the default) never gives up. */
  maxReconnectAttempts?: number;
  /** `false`: report the first failure and stop (true). */
  autoReconnect?: boolean;
  /** Messages kept, the oldest going first (500). */
  maxMessages?: number;
  /** 1 to 1000: a stream with no resume point opens with the last rows stored (null). */
  history?: number | null;
  /** Resume point of a new client (e.g. one saved in `sessionStorage`). */
  lastEventId?: string | null;
  /** Called once per message id, for new messages only. */
  onMessage?: (message: Message) => void;
  /** A message was edited (`message_updated`); `messages` holds the new version in place. */
  onMessageUpdated?: (message: Message) => void;
  /** A message was recalled (`message_deleted`); it is gone from `messages`. */
  onMessageDeleted?: (message: DeletedMessage) => void;
  /** The changes after the resume point are no longer kept: nothing is cleared; refetch. */
  onReset?: (event: ResetEvent) => void;
  /** Every event the stream delivers, with its SSE id (messages only), for logs and tools;
   * on a shared stream, those of the other tabs' sessions too. */
  onEvent?: (event: StreamEvent, id: string | null) => void;
  onConnected?: (event: ConnectedEvent) => void;
  onDisconnected?: (reason: string) => void;
  onError?: (error: SSEError) => void;
  EventSource?: new (url: string) => EventSourceLike;
}

/** A row of a feed: its declared columns under their names, as the broker sends them. */
export type FeedRow = Record<string, unknown>;

/** A filter's value: compared as text with the column's (`->>`); null or undefined: none. */
export type FilterValue = string | number | boolean | null | undefined;

/** A generic feed's `insert`, `update` or `delete` event. */
export interface FeedChange<Row extends object = FeedRow> {
  type: "insert" | "update" | "delete";
  feed: string;
  /** The row; for a delete, its primary key, key and filter columns. */
  data: Row;
  /** On an update that changed the key or a filter: their previous values. */
  old?: Partial<Row>;
  timestamp: string;
}

/** Options of a client of any feed but messages: `createSSEClient({ feed: "orders",
 * filters: { customer_id: "42" } })` streams `/api/sse/orders?customer_id=42`. */
export interface FeedClientOptions<Row extends object = FeedRow>
  extends Omit<
    SSEClientOptions,
    | "feed"
    | "sessionId"
    | "robotId"
    | "maxMessages"
    | "onMessage"
    | "onMessageUpdated"
    | "onMessageDeleted"
  > {
  /** The feed's name, as the broker's configuration declares it. */
  feed: string;
  /** Equality on the feed's key and filter columns; an absent one does not filter. (Row is
   * never inferred from filters or key: TypeScript 5.4 or later for `NoInfer`.) */
  filters?: Partial<Record<keyof NoInfer<Row> & string, FilterValue>> | null;
  /** The primary key: a column ("id"), or the columns of a composite one. */
  key?: (keyof NoInfer<Row> & string) | readonly (keyof NoInfer<Row> & string)[];
  /** Once per change: a row inserted (it is in `rows`). */
  onInsert?: (row: Row, event: FeedChange<Row>) => void;
  /** A row updated: in `rows` in place, or removed if it left the filters (`event.old`). */
  onUpdate?: (row: Row, event: FeedChange<Row>) => void;
  /** A row deleted (gone from `rows`): its primary key, key and filters. */
  onDelete?: (row: Partial<Row>, event: FeedChange<Partial<Row>>) => void;
  /** The changes after the resume point are no longer kept: `rows` were cleared; fetch the
   * rows again and `load` them. */
  onReset?: (event: ResetEvent) => void;
}

/** A feed client's snapshot: frozen, and a new object on every change. */
export interface FeedState<Row extends object = FeedRow> {
  readonly connected: boolean;
  /** Keyed by primary key, in order of first arrival. */
  readonly rows: readonly Row[];
  readonly error: SSEError | null;
  readonly reconnectAttempts: number;
  readonly lastEventId: string | null;
  readonly status: Status;
}

export interface FeedClient<Row extends object = FeedRow> extends FeedState<Row> {
  /** Open the stream (resuming after the last change seen). */
  connect(): void;
  /** Close the stream and stop reconnecting; the rows and the last id are kept. */
  disconnect(): void;
  /** Rows the app fetched (first, or after a reset), merged with the stream's: a row the
   * stream changed since the last reset keeps the stream's version. */
  load(rows: readonly Row[]): void;
  /** Forget the rows (the stream goes on). */
  clearRows(): void;
  subscribe(listener: (state: FeedState<Row>) => void): () => void;
  getSnapshot(): FeedState<Row>;
  readonly reconnecting: boolean;
  readonly shared: boolean;
  readonly url: string;
  readonly feed: string;
}

/** A snapshot: frozen, and a new object on every change. */
export interface SSEState {
  readonly connected: boolean;
  /** Unique by id, in id order, at most `maxMessages`. */
  readonly messages: readonly Message[];
  readonly error: SSEError | null;
  readonly reconnectAttempts: number;
  readonly lastEventId: string | null;
  readonly status: Status;
}

export interface SSEClient extends SSEState {
  /** Open the stream (resuming after the last id seen). Resets the attempt count. */
  connect(): void;
  /** Close the stream and stop reconnecting; messages and the last id are kept. */
  disconnect(): void;
  /** Forget the messages held; a row already received does not come back. */
  clearMessages(): void;
  /** Call `listener(state)` on every change; returns the function that unsubscribes. */
  subscribe(listener: (state: SSEState) => void): () => void;
  getSnapshot(): SSEState;
  /** True while a reconnect is scheduled. */
  readonly reconnecting: boolean;
  /** True while this client rides on the tabs' shared stream. */
  readonly shared: boolean;
  /** The URL a stream of its own opens next (without its token). */
  readonly url: string;
  readonly feed: "messages";
}

/** English labels of the statuses, for a status line. */
export const STATUS_TEXT: Readonly<Record<Status, string>>;

/** Throws a TypeError naming the option for a bad value. */
export function createSSEClient(options?: SSEClientOptions): SSEClient;
/** A client of any other feed: its rows keyed by primary key. */
export function createSSEClient<Row extends object = FeedRow>(
  options: FeedClientOptions<Row>,
): FeedClient<Row>;

/** Orders row ids (decimal strings of any length) as numbers: negative, 0 or positive. */
export function compareIds(a: string | number, b: string | number): number;
