// Callbacks for the moment a Conn closes, kept beside the Conns rather than
// in them: a connection nobody watches carries nothing for it, and one that
// is watched pays one WeakMap entry. Topics uses it to forget subscribers.

const watchers = new WeakMap<object, (() => void)[]>();

/** Calls `callback` once, when `conn` closes. */
export function onClosed(conn: object, callback: () => void): void {
  const list = watchers.get(conn);
  if (list === undefined) watchers.set(conn, [callback]);
  else list.push(callback);
}

/** `conn` has closed: runs and forgets its callbacks (Conn.close() calls it). */
export function closed(conn: object): void {
  const list = watchers.get(conn);
  if (list === undefined) return;
  watchers.delete(conn);
  for (const callback of list) callback();
}
