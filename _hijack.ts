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
   * Registers what graceful shutdown calls to close this connection (the
   * Upgrader's closer sends close 1001 and waits up to `timeoutMs`). Returns
   * a function that unregisters it; call it once the connection has ended so
   * a long-running server does not keep closers of dead connections.
   */
  track(closer: (timeoutMs: number) => Promise<void>): () => void;
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
