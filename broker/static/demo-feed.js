// The demo page's view of a feed other than messages (GET /api/sse/<feed>, docs/feeds.md):
// the browser's own EventSource, which reconnects with Last-Event-ID by itself, and a list
// of the changes as they arrive (insert, update with what it changed, delete), newest last.
// A Disconnect then Connect on the same feed and filters resumes after the last change shown
// (lastEventId); a new feed or filter starts over with the last HISTORY changes.

const CHANGES = 200; // changes kept in the list

const MESSAGES = { name: "messages", key: "sessionId", filters: ["robotId"], events: ["insert"] };

// GET /api/feeds: [{name, key, filters, events}], messages first. It is an admin route
// (stats' guard): where it is hidden (auth on, no admin port or token) or fails, the page
// offers messages, and the feed `asked` for in the URL with the URL's `columns` as its key
// (the first) and filters: a token's holder can still watch the feed the link names.
export async function loadFeeds(asked = null, columns = []) {
  try {
    const response = await fetch("/api/feeds", { headers: { Accept: "application/json" } });
    const answer = await response.json();
    if (response.ok && answer.success && Array.isArray(answer.data)) return answer.data;
  } catch {
    // a network failure or a body that is not JSON: as hidden
  }
  if (!asked || asked === MESSAGES.name) return [MESSAGES];
  return [MESSAGES, { name: asked, key: columns[0] ?? null, filters: columns.slice(1), events: [] }];
}

// The key and filter columns of `feed`, the key first (a feed known only from the URL may
// have none).
export function columnsOf(feed) {
  return [feed.key, ...feed.filters].filter((column) => column);
}

// The stream's URL: the feed's route with its key and filter values (columns given a value
// only), and the token for a broker that requires one.
export function feedUrl(feed, values, { token = null, history = 0, lastEventId = null } = {}) {
  const query = new URLSearchParams();
  for (const [column, value] of Object.entries(values)) if (value) query.set(column, value);
  if (lastEventId) query.set("lastEventId", lastEventId);
  else if (history) query.set("history", String(history));
  if (token) query.set("token", token);
  const text = query.toString();
  return `/api/sse/${encodeURIComponent(feed)}${text ? `?${text}` : ""}`;
}

// One feed stream: `onState({status, error, reconnectAttempts})` with the client's status
// names (STATUS_TEXT), `onEvent(event, id)` for every event.
export function watchFeed(feed, values, { token, history, onState, onEvent }) {
  let source = null;
  let lastId = null;
  let attempts = 0;

  function open() {
    close();
    const url = feedUrl(feed, values, { token, history, lastEventId: lastId });
    source = new EventSource(url);
    onState({ status: attempts ? "reconnecting" : "connecting", error: null, reconnectAttempts: attempts });
    source.onopen = () => {
      onState({ status: "connected", error: null, reconnectAttempts: attempts });
    };
    source.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (message.lastEventId) lastId = message.lastEventId;
      onEvent(event, message.lastEventId || null);
      if (event.type === "error") {
        onState({ status: "reconnecting", error: new Error(String(event.error)), reconnectAttempts: attempts });
      }
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CONNECTING) {
        attempts += 1;
        onState({ status: "reconnecting", error: null, reconnectAttempts: attempts });
        return;
      }
      // CLOSED: an HTTP error (400, 401, 403, 404, 503 ...), which EventSource does not
      // retry and does not show; ask once more for its JSON body to say why.
      const failed = source;
      onState({ status: "failed", error: null, reconnectAttempts: attempts });
      explain(url).then((reason) => {
        if (source === failed) onState({ status: "failed", error: new Error(reason), reconnectAttempts: attempts });
      });
    };
  }

  function close() {
    if (source) source.close();
    source = null;
  }

  return {
    connect: open,
    disconnect() {
      close();
      onState({ status: "idle", error: null, reconnectAttempts: attempts });
    },
    get lastEventId() {
      return lastId;
    },
  };
}

async function explain(url) {
  const controller = new AbortController();
  try {
    const response = await fetch(url, { signal: controller.signal });
    if (response.ok) return "The stream closed; connect again.";
    const answer = await response.json().catch(() => ({}));
    return `HTTP ${response.status}: ${answer.error || response.statusText}`;
  } catch {
    return "Cannot reach the broker.";
  } finally {
    controller.abort(); // a stream that opened this time: not for us to keep
  }
}

// One change as a list item: its op, SSE id, the key and filters, then every column of
// `data` (an update shows each changed key or filter as old -> new).
export function changeItem(feed, event, id) {
  const li = element("li", `change ${event.type}`);
  if (id) li.dataset.id = id;
  li.dataset.type = event.type;
  const meta = element("div", "meta");
  meta.append(element("span", "author", event.type));
  if (id) meta.append(element("span", "tag id", `#${id}`));
  const data = event.data && typeof event.data === "object" ? event.data : {};
  for (const column of columnsOf(feed)) {
    if (column in data) meta.append(element("span", "tag", `${column} ${show(data[column])}`));
  }
  if (typeof event.timestamp === "string") {
    const time = element("time", "", event.timestamp.slice(11, 19));
    time.dateTime = event.timestamp;
    meta.append(time);
  }
  const fields = element("dl", "columns");
  const old = event.old && typeof event.old === "object" ? event.old : {};
  for (const [column, value] of Object.entries(data)) {
    fields.append(element("dt", "", column));
    const now = show(value);
    fields.append(element("dd", "", column in old ? `${show(old[column])} → ${now}` : now));
  }
  li.append(meta, fields);
  return li;
}

// Appends `li` to `list`, keeping the last CHANGES and the scroll at the bottom if it was.
export function appendChange(list, li) {
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  while (list.children.length > CHANGES) list.firstChild.remove();
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function show(value) {
  if (value === null || value === undefined) return "null";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
