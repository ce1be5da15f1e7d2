// The rows of a feed, keyed by primary key, as a feed client (sse-client.js) keeps them: an
// insert or an update puts the row under its key (an update keeps the row's place), a delete
// removes it. Not an entry point of the package.
//
// `load(rows)` merges rows the app fetched itself (first, or after a `reset`) with what the
// stream has brought since: a key the stream has inserted, updated or deleted since the last
// reset is the stream's (every change after the reset arrives live, so its version is the
// newer, and a row it deleted stays deleted); every other key takes the fetched row. So an app
// may fetch at any time after connecting, with no gap and no stale row. The keys changed are
// remembered up to CHANGED_LIMIT (the oldest go first: a snapshot older than that many later
// changes is not one to load).

const CHANGED_LIMIT = 10000;

/** `key`: the primary key's column, or its columns for a composite key. */
export function createRows(key) {
  const columns = Array.isArray(key) ? key.map(String) : null;
  const byKey = new Map(); // key -> row, in order of first arrival
  const changed = new Set(); // keys the stream changed since the last reset
  let rows = Object.freeze([]);
  let warned = false;

  /** The row's key as a string (numbers and their text are the same key); null if absent. */
  function keyOf(row) {
    const values = columns ? columns.map((column) => row[column]) : [row[key]];
    if (values.some((value) => value === undefined || value === null)) {
      if (!warned) {
        warned = true;
        console.error(`pgsse: a row has no ${JSON.stringify(key)}: set the key option to its primary key`, row);
      }
      return null;
    }
    return columns ? JSON.stringify(values.map(String)) : String(values[0]);
  }

  function publish() {
    rows = Object.freeze([...byKey.values()]);
    return rows;
  }

  function touch(id) {
    changed.delete(id);
    changed.add(id);
    if (changed.size > CHANGED_LIMIT) changed.delete(changed.values().next().value);
  }

  return {
    get rows() {
      return rows;
    },
    /** Insert or replace the row under its key; false if it has none. */
    put(row) {
      const id = keyOf(row);
      if (id === null) return false;
      touch(id);
      byKey.set(id, row);
      publish();
      return true;
    },
    /** Remove the row under `row`'s key (a delete, or an update out of the filters). */
    remove(row) {
      const id = keyOf(row);
      if (id === null) return false;
      touch(id);
      if (byKey.delete(id)) publish();
      return true;
    },
    /** Merge fetched rows: keys the stream changed since the last reset keep its version. */
    load(fetched) {
      for (const row of fetched) {
        const id = keyOf(row);
        if (id !== null && !changed.has(id)) byKey.set(id, row);
      }
      return publish();
    },
    /** Forget every row and every change (a `reset`). */
    clear() {
      byKey.clear();
      changed.clear();
      return publish();
    },
  };
}

/** Whether a row's column value passes a filter: text equality, as the broker compares (a
 * number or a boolean as PostgreSQL's `->>` writes it; null never matches). */
export function passes(value, wanted) {
  if (value === null || value === undefined) return false;
  if (typeof value === "number") return String(value) === wanted || Number(wanted) === value;
  if (typeof value === "object") return JSON.stringify(value) === wanted;
  return String(value) === wanted;
}
