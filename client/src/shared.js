// One stream for every tab of an origin: a leader tab holds it, the others listen.
//
// Over HTTP/1.1 a browser opens at most 6 connections per host, and every stream holds one
// for good: a 7th tab (or a 4th chat in 2 tabs) waits forever. So the clients of all tabs
// share: each tab announces its subscriptions on a BroadcastChannel; the tab holding a Web
// Lock (`navigator.locks`, granted to one tab at a time, and to the next when it closes) is the
// leader: it merges every tab's subscriptions into one stream per robot filter (`sessionId`
// repeated, at most SESSIONS_PER_STREAM each; any client of every session makes it the global
// stream; a generic feed's clients, one stream per feed and filters) and posts each event to
// the channel. Every tab, the leader too, hands each message to its clients whose filter
// matches (each feed event to the clients of its stream), and remembers the last id of each
// stream: the next leader resumes from it, so a handover loses nothing; a row the old leader
// sent after that id comes again, and the clients drop the ids they have seen, so none is
// shown twice.
//
// Caveats, by design: the leader's token (its clients' `getToken`/`token`) opens the stream,
// so every tab must be allowed the sessions it asks for under that token (tabs of one user);
// tabs that must not share give different `baseUrl`s. A subscription added to a running
// stream reopens it, resuming from its last id: the new subscription is live from then on.

import { compareIds, createConnection, SSEError } from "./connection.js";

const SESSIONS_PER_STREAM = 100; // the broker's bound on `sessionId` repeated
const tabs = new Map(); // channel name -> this tab's Tab

/** The shared transport for one client, or null where the browser cannot share. */
export function joinShared(opts, member) {
  if (typeof BroadcastChannel !== "function" || !globalThis.navigator?.locks?.request) return null;
  const name = `pgsse:${new URL(String(opts.baseUrl || "/"), globalThis.location?.href).origin}`;
  let tab = tabs.get(name);
  if (!tab) {
    tab = new Tab(name);
    tabs.set(name, tab);
  }
  const current = tab;
  let joined = false;
  return {
    shared: true,
    connect() {
      if (!joined) current.add(member, opts);
      joined = true;
    },
    disconnect() {
      if (joined) current.remove(member);
      joined = false;
    },
    get reconnecting() {
      return current.stateOf(member).status === "reconnecting";
    },
  };
}

const randomId = () => Math.random().toString(36).slice(2) + Date.now().toString(36);

class Tab {
  constructor(name) {
    this.name = name;
    this.id = randomId();
    this.members = new Map(); // member -> its client's options
    this.others = new Map(); // tab id -> its subscriptions
    this.lastIds = new Map(); // stream key -> last id seen on it
    this.streams = new Map(); // stream key (leader only) -> { spec, connection, state }
    this.resumed = new Set(); // member ids whose `after` the leader has honoured
    this.leader = false;
    this.requested = false; // the lock asked for, not yet granted
    this.release = null; // ends the lock's hold
    this.states = {}; // group ("" for messages, else the feed) -> its streams' state
    this.pending = false; // a reconcile queued

    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (event) => this.receive(event.data);
    this.post({ t: "hello", tab: this.id });
    // A tab that goes (or into the back-forward cache) takes its subscriptions along; one
    // that comes back from that cache brings them back.
    globalThis.addEventListener?.("pagehide", () => this.post({ t: "subs", tab: this.id, subs: [] }));
    globalThis.addEventListener?.("pageshow", (event) => event.persisted && this.announce());
    const nudge = () => (this.leader ? this.nudge() : this.post({ t: "nudge" }));
    globalThis.addEventListener?.("online", nudge);
    globalThis.document?.addEventListener("visibilitychange", () => {
      if (globalThis.document.visibilityState === "visible") nudge();
    });
  }

  post(message) {
    try {
      this.channel.postMessage(message);
    } catch (error) {
      console.error("pgsse: BroadcastChannel post failed", error);
    }
  }

  subscriptions() {
    return [...this.members].map(([{ feed, sessions, robotId }, { id, after }]) => ({
      id,
      feed,
      sessions,
      robotId,
      after,
    }));
  }

  // `after`: the member's last id as it joins, the point its stream must resume from.
  add(member, opts) {
    this.members.set(member, { ...opts, id: randomId(), after: member.after });
    member.onState(this.stateOf(member));
    this.announce();
    if (!this.release && !this.requested) {
      this.requested = true;
      navigator.locks.request(`${this.name}:leader`, () => {
        this.requested = false;
        if (this.members.size === 0) return undefined; // left while waiting: let it go
        return new Promise((resolve) => {
          this.release = resolve;
          this.lead();
        });
      });
    }
  }

  remove(member) {
    this.members.delete(member);
    this.announce();
    if (this.members.size === 0 && this.release) {
      // Nothing to watch here: another tab that has subscriptions leads.
      const streams = [...this.streams.values()];
      this.streams.clear();
      for (const { connection } of streams) connection.disconnect();
      this.leader = false;
      this.release();
      this.release = null;
    }
  }

  announce() {
    this.post({ t: "subs", tab: this.id, subs: this.subscriptions() });
    if (this.leader) this.schedule();
  }

  receive(message) {
    switch (message && message.t) {
      case "hello":
        this.post({ t: "subs", tab: this.id, subs: this.subscriptions() });
        if (this.leader) this.post({ t: "state", states: wireAll(this.states) });
        break;
      case "subs":
        if (message.subs.length) this.others.set(message.tab, message.subs);
        else this.others.delete(message.tab);
        if (this.leader) this.schedule();
        break;
      case "event":
        this.dispatch(message.key, message.data, message.id);
        break;
      case "state":
        if (!this.leader && message.states) this.setStates(unwireAll(message.states));
        break;
      case "nudge":
        if (this.leader) this.nudge();
        break;
      default:
        break;
    }
  }

  // The last leader honoured the resume points of the subscriptions known now (had it not,
  // its stream would not have been past them): only later joins rewind the stream.
  lead() {
    this.leader = true;
    for (const { id } of [...this.subscriptions(), ...[...this.others.values()].flat()]) {
      this.resumed.add(id);
    }
    this.reconcile();
  }

  // Changes made in one task (React's StrictMode mounts, unmounts and mounts again at once)
  // are merged into one reconcile: a microtask, which no background-tab timer throttling
  // delays.
  schedule() {
    if (this.pending) return;
    this.pending = true;
    queueMicrotask(() => {
      this.pending = false;
      if (this.leader) this.reconcile();
    });
  }

  // The network or a tab came back: a retry the leader has pending runs now, whichever tab
  // noticed (the leader may be a hidden tab, whose own events say nothing of the user's).
  nudge() {
    for (const { connection } of this.streams.values()) connection.retryNow();
  }

  // The streams every tab's subscriptions need, opened, reopened or closed to match. A
  // subscription that joins with a last id older than its stream's reopens the stream from
  // there: it gets what it missed, and the others drop the rows they have.
  reconcile() {
    const subscriptions = [...this.subscriptions(), ...[...this.others.values()].flat()];
    const wanted = new Map();
    const specs = new Map();
    for (const { feed, sessions, robotId } of subscriptions) {
      // A generic feed's stream per feed and filters, shared by the clients asking the same.
      if (feed) {
        specs.set(`f:${feed}`, { feed, robotId: null, sessions: null });
        continue;
      }
      const robot = robotId ?? "";
      const group = wanted.get(robot) || { robotId, sessions: new Set(), global: false };
      wanted.set(robot, group);
      if (sessions === null) group.global = true;
      else for (const session of sessions) group.sessions.add(session);
    }
    for (const [robot, group] of wanted) {
      const all = group.global ? [null] : chunks([...group.sessions].sort(), SESSIONS_PER_STREAM);
      all.forEach((sessions, n) => {
        specs.set(`m:${robot}#${n}`, { feed: null, robotId: group.robotId, sessions });
      });
    }
    const rewind = new Set();
    for (const { id, feed, sessions, robotId, after } of subscriptions) {
      if (!after || this.resumed.has(id)) continue;
      this.resumed.add(id);
      for (const [key, spec] of specs) {
        const covers = feed
          ? spec.feed === feed
          : !spec.feed &&
            (spec.robotId ?? "") === (robotId ?? "") &&
            (spec.sessions === null || !sessions || sessions.some((x) => spec.sessions.includes(x)));
        const last = this.lastIds.get(key);
        if (covers && (!last || compareIds(after, last) < 0)) {
          this.lastIds.set(key, after);
          rewind.add(key);
        }
      }
    }
    for (const [key, stream] of this.streams) {
      const spec = specs.get(key);
      if (!spec || !sameSpec(spec, stream.spec) || rewind.has(key)) {
        this.streams.delete(key);
        stream.connection.disconnect();
      }
    }
    const opts = this.members.values().next().value;
    for (const [key, spec] of specs) {
      if (this.streams.has(key) || !opts) continue;
      const stream = { spec, state: { connected: false, attempts: 0, error: null, status: "connecting" } };
      const [name, filters] = spec.feed ? splitFeed(spec.feed) : ["messages", ""];
      stream.connection = createConnection(opts, {
        path: `/api/sse/${name}`,
        query: () => {
          const params = new URLSearchParams(filters);
          for (const session of spec.sessions || []) params.append("sessionId", session);
          if (spec.robotId != null) params.set("robotId", spec.robotId);
          const last = this.lastIds.get(key);
          if (last) params.set("lastEventId", last);
          return params;
        },
        onEvent: (_body, event) => {
          if (this.streams.get(key) !== stream) return;
          this.post({ t: "event", key, data: event.data, id: event.lastEventId });
          this.dispatch(key, event.data, event.lastEventId);
        },
        onState: (state) => {
          if (this.streams.get(key) !== stream) return;
          stream.state = state;
          this.publishState();
        },
      });
      this.streams.set(key, stream);
      stream.connection.connect();
    }
    this.publishState();
  }

  // The tabs' view of the shared connection: connected when every stream is.
  publishState() {
    if (!this.streams.size) return;
    const states = {};
    for (const { spec, state } of this.streams.values()) {
      const group = spec.feed ?? "";
      if (!states[group] || (states[group].connected && !state.connected)) states[group] = state;
    }
    this.setStates(states);
    this.post({ t: "state", states: wireAll(states) });
  }

  // A client's state is that of its own streams: a feed's stream, or (for messages) the worst
  // of the messages streams, connected when all are.
  stateOf(member) {
    return this.states[member.feed ?? ""] || CONNECTING;
  }

  setStates(states) {
    const before = new Map([...this.members.keys()].map((member) => [member, this.stateOf(member)]));
    this.states = states;
    for (const [member, was] of before) {
      const state = this.stateOf(member);
      if (state !== was) member.onState(state);
    }
  }

  dispatch(key, data, id) {
    if (id) this.lastIds.set(key, id);
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    const event = { data, lastEventId: id || "" };
    const feed = key.startsWith("f:") ? key.slice(2) : null;
    for (const member of this.members.keys()) {
      const mine = (member.feed ?? null) === feed && (feed !== null || wants(member, body));
      if (mine) member.onEvent(body, event);
    }
  }
}

// Which events of its stream a member gets: a message of its sessions and robot; a change of
// a message it matches or has received (an edit may take a message out of its sessions: it
// must see it leave); every other event (connected, heartbeat, error, reset).
function wants(member, body) {
  switch (body.type) {
    case "message":
      return Boolean(body.data) && member.matches(body.data);
    case "message_updated":
    case "message_deleted":
      return Boolean(body.data) && member.concerns(body.data);
    default:
      return true;
  }
}

function chunks(list, size) {
  const out = [];
  for (let at = 0; at < list.length; at += size) out.push(list.slice(at, at + size));
  return out;
}

function sameSpec(a, b) {
  return a.feed === b.feed && a.robotId === b.robotId && String(a.sessions) === String(b.sessions);
}

// A feed subscription, `orders?customer_id=42`: the feed's name and its filters' query.
function splitFeed(feed) {
  const at = feed.indexOf("?");
  return at < 0 ? [feed, ""] : [feed.slice(0, at), feed.slice(at + 1)];
}

const CONNECTING = Object.freeze({ connected: false, attempts: 0, error: null, status: "connecting" });

// Errors cross the channel as their message and reason.
function wireAll(states) {
  const wire = ({ error, ...state }) => ({
    ...state,
    error: error && { message: error.message, reason: error.reason },
  });
  return Object.fromEntries(Object.entries(states).map(([group, state]) => [group, wire(state)]));
}

function unwireAll(states) {
  const unwire = ({ error, ...state }) => ({
    ...state,
    error: error && new SSEError(error.message, error.reason),
  });
  return Object.fromEntries(Object.entries(states).map(([group, state]) => [group, unwire(state)]));
}
