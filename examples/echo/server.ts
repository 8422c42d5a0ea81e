/**
 * Echo server: every message that arrives goes straight back with the same
 * type (text stays text, binary stays binary).
 *
 * `GET /` without an upgrade serves a page whose script talks to `/ws`; a
 * WebSocket upgrade is accepted on any path, so tools can connect to `/`.
 * This is also the server the benchmark harness runs, so the connection loop
 * is the plain `readMessage()` / `writeMessage()` loop of gorilla's echo
 * example and nothing else.
 *
 * ```sh
 * deno task echo                       # http://127.0.0.1:8080/
 * deno run -A examples/echo/server.ts --port 9000 --compress
 * ```
 *
 * @module
 */
import {
  type Conn,
  isCloseError,
  isWebSocketUpgrade,
  serve,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { parseServerArgs } from "../_cli.ts";

/** Options for {@linkcode createHandler} and {@linkcode startServer}. */
export interface EchoOptions {
  /** Negotiate permessage-deflate (RFC 7692) with clients that offer it. */
  compress?: boolean;
  /**
   * Called for every upgraded connection, with a promise that settles (never
   * rejects) once the server is done with it.
   */
  onConnection?: (conn: Conn, done: Promise<void>) => void;
}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends EchoOptions {
  /** Port to listen on; 0 picks a free one. */
  port: number;
  /** Interface to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** Called once the listener is bound. */
  onListen?: (addr: Deno.NetAddr) => void;
}

const page = new URL("./index.html", import.meta.url);

/**
 * Echoes every message on `conn` until the connection ends, then closes it.
 * A close from the peer is the normal end; anything else is logged.
 *
 * @param conn A server connection.
 * @returns Settles when the connection has ended; never rejects.
 */
export async function echo(conn: Conn): Promise<void> {
  try {
    for (;;) {
      const { type, data } = await conn.readMessage();
      await conn.writeMessage(type, data);
    }
  } catch (error) {
    if (!isCloseError(error)) console.error("echo:", error);
  } finally {
    conn.close();
  }
}

/**
 * Builds the request handler: the page on `GET /`, an echo connection for
 * every WebSocket upgrade.
 *
 * @param options Compression and the connection hook.
 * @returns A handler for {@linkcode serve}.
 * @throws {TypeError} If the Upgrader refuses the options.
 */
export function createHandler(
  options: EchoOptions = {},
): ServeHandler {
  const upgrader = new Upgrader({ enableCompression: options.compress });
  return async (request) => {
    if (isWebSocketUpgrade(request)) {
      const conn = await upgrader.upgrade(request);
      // Started before the hook: `?.()` would skip evaluating its arguments.
      const done = echo(conn);
      options.onConnection?.(conn, done);
      return;
    }
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
  };
}

/**
 * Starts the echo server.
 *
 * @param options Where to listen, and the example's own options.
 * @returns The running server; `shutdown()` stops it.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(options: StartOptions): Server {
  return serve({
    port: options.port,
    hostname: options.hostname ?? "127.0.0.1",
    onListen: options.onListen ?? (() => {}),
  }, createHandler(options));
}

if (import.meta.main) {
  const args = parseServerArgs(
    Deno.args,
    "Usage: server.ts [--port N] [--hostname H] [--compress]",
    { compress: { type: "boolean", default: false } },
  );
  const compress = args.flags.compress === true;
  startServer({
    port: args.port,
    hostname: args.hostname,
    compress,
    onListen: ({ hostname, port }) =>
      console.log(
        `Echo server on http://${hostname}:${port}/ (WebSocket on any path${
          compress ? ", permessage-deflate enabled" : ""
        })`,
      ),
  });
}
