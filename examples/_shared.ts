// What the example servers have in common besides their command line (that is
// `_cli.ts`): where they listen, the hook the tests use to follow each
// connection, the page they serve next to the WebSocket endpoint, and the
// keepalive timings gorilla's examples use. Each example's own logic (its
// connection loops) stays in its server.ts.
import { type Conn, serve, type ServeHandler, type Server } from "../mod.ts";

/** Where an example server listens. */
export interface ListenOptions {
  /** Port to listen on; 0 picks a free one. */
  port: number;
  /** Interface to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** Called once the listener is bound. */
  onListen?: (addr: Deno.NetAddr) => void;
  /** Share the port with other processes (needs --unstable-net). */
  reusePort?: boolean;
}

/** The hook every example's `createHandler` accepts. */
export interface ConnectionHook {
  /**
   * Called for every upgraded connection, with a promise that settles (never
   * rejects) once the server is done with it.
   */
  onConnection?: (conn: Conn, done: Promise<void>) => void;
}

/**
 * Starts `handler` on `options.port` / `options.hostname`, on loopback unless
 * told otherwise, and silent unless `onListen` is given.
 */
export function listen(options: ListenOptions, handler: ServeHandler): Server {
  return serve({
    port: options.port,
    hostname: options.hostname ?? "127.0.0.1",
    reusePort: options.reusePort,
    onListen: options.onListen ?? (() => {}),
  }, handler);
}

/**
 * Answers a request that is not a WebSocket upgrade: the example's HTML page
 * on `GET /` (and `HEAD /`), 405 for other methods there, 404 elsewhere.
 */
export async function servePage(
  request: Request,
  page: URL,
): Promise<Response> {
  const { pathname } = new URL(request.url);
  if (pathname !== "/") return new Response("Not found\n", { status: 404 });
  if (request.method !== "GET" && request.method !== "HEAD") {
    return new Response("Method not allowed\n", {
      status: 405,
      headers: { allow: "GET, HEAD" },
    });
  }
  return new Response(await Deno.readFile(page), {
    headers: { "content-type": "text/html; charset=utf-8" },
  });
}

/** The time `ms` from now, for `setReadDeadline` and friends. */
export function deadline(ms: number): Date {
  return new Date(Date.now() + ms);
}

/**
 * Keepalive timings of a server that pings its peers, as in gorilla's chat
 * and filewatch examples.
 */
export interface KeepaliveOptions {
  /** Time allowed to write one message or ping, in ms (default 10 s). */
  writeWait?: number;
  /**
   * Time allowed between two pongs from the peer, in ms (default 60 s): the
   * read deadline, pushed back by every pong.
   */
  pongWait?: number;
  /** Ping period in ms; must be less than `pongWait` (default 9/10 of it). */
  pingPeriod?: number;
}

/**
 * Fills in gorilla's defaults (10 s, 60 s, 54 s).
 *
 * @throws {RangeError} If `pingPeriod` is not less than `pongWait`: the peer
 * would time out between two pings.
 */
export function keepalive(
  options: KeepaliveOptions,
  what: string,
): Required<KeepaliveOptions> {
  const pongWait = options.pongWait ?? 60_000;
  const pingPeriod = options.pingPeriod ?? pongWait * 9 / 10;
  if (!(pingPeriod < pongWait)) {
    throw new RangeError(
      `Cannot start the ${what}: pingPeriod (${pingPeriod} ms) must be less than pongWait (${pongWait} ms)`,
    );
  }
  return { writeWait: options.writeWait ?? 10_000, pongWait, pingPeriod };
}
