// The link between a Request built by serve() and the socket it arrived on,
// so that upgrader.upgrade(request) can take the socket over, as Go's
// http.Hijacker does. The registry is a WeakMap: a Request that nobody takes
// leaves nothing behind.

/** A connection handed over by `serve()`: from now on it belongs to the taker. */
export interface HijackedConnection {
  /** The raw socket; `serve()` no longer reads, writes or closes it. */
  conn: Deno.Conn;
  /** Bytes read past the request head (pipelined data, first frames). */
  head: Uint8Array;
  /**
   * Registers how `serve()` closes this connection: with 1001 on graceful
   * shutdown, with 1011 when the handler that took it fails.
   */
  track(closer: Closer): void;
  /**
   * Unregisters `closer`; call it once the connection has ended so a
   * long-running server does not keep closers of dead connections. The same
   * function for every connection of a server, so keeping it costs nothing.
   */
  untrack(closer: Closer): void;
}

/**
 * How `serve()` closes a connection it handed over. An object rather than a
 * function, so that the Upgrader's transport can be its own closer instead
 * of keeping a closure (and its scope) per connection.
 */
export interface Closer {
  /**
   * Closes the taken connection with a close code, waiting up to
   * `timeoutMs` for the closing handshake (before the 101 it just closes
   * the socket).
   */
  closeWith(code: number, timeoutMs: number): Promise<void>;
}

/**
 * What `_serve.ts` registers per request: a function that hands the socket
 * over, or returns undefined when that is no longer possible (the response
 * has been sent, or the connection already ended).
 */
export type Take = () => HijackedConnection | undefined;

const registry = new WeakMap<Request, Take>();

/** Makes `request`'s socket available to {@linkcode takeConnection}. */
export function registerConnection(request: Request, take: Take): void {
  registry.set(request, take);
}

/**
 * Takes over the socket `request` arrived on, if it came from `serve()` and
 * its handler has not returned yet. A connection can be taken once: later
 * calls, and requests from anywhere else, return undefined.
 */
export function takeConnection(
  request: Request,
): HijackedConnection | undefined {
  const take = registry.get(request);
  if (take === undefined) return undefined;
  registry.delete(request);
  return take();
}
