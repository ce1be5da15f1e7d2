// The demo page at GET /: one sse-client.js client (the pgsse-client package's), rendered
// into plain DOM. It opens on the session in the URL (?sessionId=…&robotId=…; 123 by default,
// the README's example), or on every session (?all=1, "All sessions"), with its last HISTORY
// messages, then live ones, each with its id and session; below them the raw events as the
// stream delivered them and the curl line of the same stream. The URL may also give a
// `token` for a broker that requires one (used for the stream and for sending), and, for trying
// failure modes, the client's reconnectInterval, maxReconnectInterval and maxReconnectAttempts
// (a number or Infinity, the default: never give up).
//
// Where the broker declares other feeds (GET /api/feeds), a Feed picker appears: a feed other
// than messages is watched with inputs for its key and filter columns and its changes listed
// as they arrive (demo-feed.js); ?feed=orders&customer_id=42 opens on it.

import {
  appendChange,
  changeItem,
  columnsOf,
  element,
  feedUrl,
  loadFeeds,
  watchFeed,
} from "./demo-feed.js";
import { createSSEClient, STATUS_TEXT } from "./sse-client.js";

const DEFAULT_SESSION = "123";
const HISTORY = 50;
const RAW_EVENTS = 200; // lines kept in the raw event log

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const number = (name, fallback, { integer = false } = {}) => {
  const value = params.get(name) === "Infinity" ? Infinity : Number(params.get(name));
  const valid = integer ? Number.isInteger(value) || value === Infinity : Number.isFinite(value);
  return params.has(name) && valid && value >= 0 ? value : fallback;
};
const settings = {
  reconnectInterval: number("reconnectInterval", 1000),
  maxReconnectInterval: number("maxReconnectInterval", 15000),
  maxReconnectAttempts: number("maxReconnectAttempts", Infinity, { integer: true }),
  history: HISTORY,
  token: params.get("token") || null,
};

let client = null;
let current = null; // the session (null: all) and robot `client` streams
let unsubscribe = null;
const items = new Map(); // message id -> its <li>
let feeds = new Map(); // name -> {name, key, filters, events}, from GET /api/feeds
let watcher = null; // the stream of a feed other than messages
let watching = null; // its feed and filter values, as a string to compare

const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

// Connect: a new client for a new session or robot; the same one otherwise, so that a
// Disconnect then Connect resumes after the last message shown and loses nothing.
function start() {
  const feed = feeds.get($("feed").value);
  if (feed && feed.name !== "messages") {
    startFeed(feed);
    return;
  }
  stopFeed();
  showView("messages");
  const all = $("all").checked || !$("session").value.trim();
  $("all").checked = all;
  const sessionId = all ? null : $("session").value.trim();
  const robotId = $("robot").value.trim() || null;
  const query = withoutFeed(new URLSearchParams(params));
  if (all) {
    query.set("all", "1");
    query.delete("sessionId");
  } else {
    query.delete("all");
    query.set("sessionId", sessionId);
  }
  if (robotId) query.set("robotId", robotId);
  else query.delete("robotId");
  history.replaceState(null, "", `?${query}`);

  if (!client || current.sessionId !== sessionId || current.robotId !== robotId) {
    if (client) client.disconnect();
    if (unsubscribe) unsubscribe();
    for (const li of items.values()) li.remove();
    items.clear();
    $("events").replaceChildren();
    client = createSSEClient({ sessionId, robotId, ...settings, onEvent: logEvent });
    current = { sessionId, robotId };
    unsubscribe = client.subscribe(render);
    showCurl(sessionId, robotId);
  }
  client.connect();
}

// A feed other than messages: the stream of its key and filter values as typed.
function startFeed(feed) {
  if (client) client.disconnect();
  showView("feed");
  const values = {};
  for (const column of columnsOf(feed)) {
    values[column] = document.getElementById(`filter-${column}`)?.value.trim() || "";
  }
  const query = withoutFeed(new URLSearchParams(params));
  for (const name of ["sessionId", "robotId", "all"]) query.delete(name);
  query.set("feed", feed.name);
  for (const [column, value] of Object.entries(values)) if (value) query.set(column, value);
  history.replaceState(null, "", `?${query}`);

  const wanted = JSON.stringify([feed.name, values]);
  if (!watcher || watching !== wanted) {
    if (watcher) watcher.disconnect();
    $("changes").replaceChildren();
    $("changes-count").textContent = "0";
    $("events").replaceChildren();
    $("changes-feed").textContent = feed.name;
    watching = wanted;
    watcher = watchFeed(feed.name, values, {
      token: settings.token,
      history: HISTORY,
      onState: renderStatus,
      onEvent: (event, id) => {
        logEvent(event, id);
        if (["insert", "update", "delete"].includes(event.type)) {
          appendChange($("changes"), changeItem(feed, event, id));
          $("changes-count").textContent = String($("changes").children.length);
        }
      },
    });
    const shown = feedUrl(feed.name, values, { token: settings.token && "$TOKEN" });
    $("curl").value = `curl -N '${location.origin}${shown.replace("%24TOKEN", "$TOKEN")}'`;
  }
  watcher.connect();
}

function stopFeed() {
  if (watcher) watcher.disconnect();
  watcher = null;
  watching = null;
}

// The URL's query without the feed and the columns of any feed: what messages leave in it.
function withoutFeed(query) {
  query.delete("feed");
  for (const feed of feeds.values()) {
    if (feed.name === "messages") continue;
    for (const column of columnsOf(feed)) query.delete(column);
  }
  return query;
}

// The messages view (session, robot, the conversation, sending) or a feed's (its filter
// columns, its changes).
function showView(view) {
  const messages = view === "messages";
  for (const node of document.querySelectorAll(".messages-only")) node.hidden = !messages;
  $("messages-view").hidden = !messages;
  $("send").hidden = !messages;
  $("changes-view").hidden = messages;
  $("feed-filters").hidden = messages;
}

// One input per key and filter column of the picked feed, filled from the URL the first time.
function showFilters(feed) {
  const box = $("feed-filters");
  box.replaceChildren();
  if (!feed || feed.name === "messages") return;
  for (const [index, column] of columnsOf(feed).entries()) {
    const field = element("div", "field");
    const label = element("label", "", column);
    label.htmlFor = `filter-${column}`;
    const role = !feed.events.length ? "" : index === 0 ? " (key)" : " (filter)"; // known?
    if (role) label.append(element("span", "optional", role));
    const input = element("input");
    input.id = `filter-${column}`;
    input.name = column;
    input.maxLength = 255;
    input.autocomplete = "off";
    input.spellcheck = false;
    input.placeholder = index === 0 ? "every key (global)" : "any";
    input.value = params.get("feed") === feed.name ? params.get(column) || "" : "";
    field.append(label, input);
    box.append(field);
  }
}

// The raw events, newest last: what someone checking their own INSERTs wants to see.
function logEvent(event, id) {
  const list = $("events");
  const li = element("li");
  li.dataset.type = String(event.type);
  const time = typeof event.timestamp === "string" ? event.timestamp.slice(11, 23) : "";
  const detail =
    event.type === "message"
      ? `id ${id} · session ${event.data?.sessionId}`
      : event.type === "error"
        ? String(event.error)
        : event.type === "connected" && event.sessionId !== undefined
          ? `session ${event.sessionId ?? "(all)"}${event.robotId ? ` · robot ${event.robotId}` : ""}`
          : ["insert", "update", "delete"].includes(event.type)
            ? `id ${id} · ${event.feed}`
            : event.type === "reset"
              ? String(event.reason)
              : "";
  li.textContent = `${time} ${event.type}${detail ? `: ${detail}` : ""}`;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  while (list.children.length > RAW_EVENTS) list.firstChild.remove();
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function showCurl(sessionId, robotId) {
  const query = new URLSearchParams();
  if (sessionId) query.set("sessionId", sessionId);
  if (robotId) query.set("robotId", robotId);
  if (settings.token) query.set("token", "$TOKEN");
  const text = query.toString().replace("%24TOKEN", "$TOKEN");
  $("curl").value = `curl -N '${location.origin}/api/sse/messages${text ? `?${text}` : ""}'`;
}

function stop() {
  if (client) client.disconnect();
}

function render(state) {
  renderStatus(state);
  renderMessages(state.messages);
}

function renderStatus(state) {
  const status = $("status");
  const text = $("status-text");
  status.dataset.state = state.status;
  text.textContent = STATUS_TEXT[state.status];
  $("reconnects").textContent = String(state.reconnectAttempts);
  // A retry in progress is a warning shown quietly (the status says "Reconnecting…"); only
  // giving up is an alert that screen readers announce at once.
  const error = $("error");
  const failed = state.status === "failed";
  error.hidden = !state.error;
  error.classList.toggle("warning", !failed);
  if (failed) error.setAttribute("role", "alert");
  else error.removeAttribute("role");
  error.textContent = state.error ? state.error.message : "";
}

function renderMessages(messages) {
  const list = $("messages");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const keep = new Set(messages.map((message) => message.id));
  for (const [id, li] of items) {
    if (!keep.has(id)) {
      li.remove();
      items.delete(id);
    }
  }
  let previous = null;
  for (const message of messages) {
    let li = items.get(message.id);
    if (!li) {
      li = messageItem(message);
      items.set(message.id, li);
    }
    const expected = previous ? previous.nextSibling : list.firstChild;
    if (expected !== li) list.insertBefore(li, expected);
    previous = li;
  }
  $("count").textContent = String(messages.length);
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function messageItem(message) {
  const li = element("li", `message ${message.isFromBot ? "bot" : "human"}`);
  li.dataset.id = message.id;
  const meta = element("div", "meta");
  meta.append(element("span", "author", message.isFromBot ? "Bot" : "Human"));
  meta.append(element("span", "tag id", `#${message.id}`));
  meta.append(element("span", "tag session", message.sessionId));
  if (message.robotId) meta.append(element("span", "tag robot", message.robotId));
  if (message.intent) meta.append(element("span", "tag intent", message.intent));
  const time = element("time");
  const created = new Date(message.createdAt);
  time.dateTime = message.createdAt;
  time.title = message.createdAt;
  time.textContent = Number.isNaN(created.getTime()) ? "" : timeFormat.format(created);
  meta.append(time);
  li.append(meta, element("p", "content", message.content));
  return li;
}

async function send(event) {
  event.preventDefault();
  const sessionId = $("session").value.trim();
  const content = $("content").value;
  if (!sessionId) {
    $("send-status").textContent = "Enter a session to send to.";
    $("session").focus();
    return;
  }
  if (!content.trim()) return;
  const asBot = $("as-bot").checked;
  const body = { sessionId, content, isFromBot: asBot, isHuman: !asBot };
  const robotId = $("robot").value.trim();
  const intent = $("intent").value.trim();
  if (robotId) body.robotId = robotId;
  if (intent) body.intent = intent;

  const button = $("send-button");
  const status = $("send-status");
  button.disabled = true;
  status.classList.remove("failed");
  status.textContent = "Sending…";
  try {
    const headers = { "Content-Type": "application/json" };
    if (settings.token) headers.Authorization = `Bearer ${settings.token}`;
    const response = await fetch("/api/messages", {
      method: "POST",
      headers,
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status !== 201 || !answer.success) {
      throw new Error(answer.error || `HTTP ${response.status}`);
    }
    status.textContent = `Sent as message ${answer.data.id}.`;
    $("content").value = "";
  } catch (error) {
    status.classList.add("failed");
    status.textContent = `Not sent: ${error.message}`;
  } finally {
    button.disabled = false;
    $("content").focus();
  }
}

$("all").checked = params.get("all") === "1";
$("session").value = params.get("sessionId") || ($("all").checked ? "" : DEFAULT_SESSION);
$("robot").value = params.get("robotId") || "";
$("subscribe").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
$("disconnect").addEventListener("click", () => (watcher ? watcher.disconnect() : stop()));
$("clear").addEventListener("click", () => {
  if (watcher) {
    $("changes").replaceChildren();
    $("changes-count").textContent = "0";
  } else if (client) client.clearMessages();
});
$("send").addEventListener("submit", send);
$("content").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("send").requestSubmit();
  }
});

// For tests and the browser console.
window.pgsse = {
  get client() {
    return client;
  },
  get feed() {
    return watcher;
  },
};

// The feed picker, shown only where there is a feed besides messages. The messages stream
// starts at once unless the URL asks for another feed, which needs the list first.
$("feed").addEventListener("change", () => {
  showFilters(feeds.get($("feed").value));
  start();
});
const asked = params.get("feed");
if (!asked || asked === "messages") start();
// Parameters of the page itself; any other in the URL names a column of the feed asked for.
const PAGE = ["feed", "token", "sessionId", "robotId", "all", "history", "lastEventId"];
const SETTINGS = ["reconnectInterval", "maxReconnectInterval", "maxReconnectAttempts"];
const columns = [...new Set(params.keys())].filter((n) => ![...PAGE, ...SETTINGS].includes(n));
loadFeeds(asked, columns).then((list) => {
  feeds = new Map(list.map((feed) => [feed.name, feed]));
  $("feed").replaceChildren(...list.map((feed) => new Option(feed.name, feed.name)));
  $("feed-field").hidden = list.length < 2;
  $("subscribe").classList.toggle("with-feeds", list.length > 1);
  if (!asked || asked === "messages") return;
  if (!feeds.has(asked)) {
    const error = new Error(`No feed ${asked} on this broker: pick one and Connect.`);
    renderStatus({ status: "failed", error, reconnectAttempts: 0 });
    return;
  }
  $("feed").value = asked;
  showFilters(feeds.get(asked));
  start();
});
