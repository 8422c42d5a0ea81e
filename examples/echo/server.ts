/**
 * Echo server: every message that arrives goes straight back with the same
 * type (text stays text, binary stays binary).
 *
 * `GET /` without an upgrade serves a page whose script talks to `/ws`; a
 * WebSocket upgrade is accepted on any path, so tools can connect to `/`.
 * This is also the server external echo benchmarks run, so the connection loop
 * is the plain `readMessage()` / `writeMessage()` loop of gorilla's echo
 * example and nothing else.
 *
 * ```sh
 * deno task echo                       # http://127.0.0.1:8080/
 * deno run -A examples/echo/server.ts --port 9000 --compress
 * deno run -A examples/echo/server.ts --compression-level 1 --compress
 * ```
 *
 * @module
 */
import {
  type Conn,
  ConnectionClosedError,
  isCloseError,
  isWebSocketUpgrade,
  ProtocolError,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { exitWithUsage, parseServerArgs } from "../_cli.ts";
import {
  type ConnectionHook,
  listen,
  type ListenOptions,
  servePage,
} from "../_shared.ts";

/** Options for {@linkcode createHandler} and {@linkcode startServer}. */
export interface EchoOptions extends ConnectionHook {
  /** Negotiate permessage-deflate (RFC 7692) with clients that offer it. */
  compress?: boolean;
  /** Compress at this level (gorilla's -2 to 9) instead of CompressionStream's. */
  compressionLevel?: number;
}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends EchoOptions, ListenOptions {}

const page = new URL("./index.html", import.meta.url);

/**
 * The largest message echoed, in bytes: room for the benchmarks' 1 MiB
 * messages, and a bound on what one client (or one decompression bomb) can
 * make the server hold.
 */
export const READ_LIMIT = 4 * 1024 * 1024;

/**
 * Echoes every message on `conn` until the connection ends, then closes it.
 * A close, from the peer or from here (a server shutdown), is the normal
 * end; anything else is logged (a protocol error or a message over the read
 * limit in one line).
 *
 * @param conn A server connection.
 * @returns Settles when the connection has ended; never rejects.
 */
export async function echo(conn: Conn): Promise<void> {
  try {
    for (;;) {
      const message = await conn.readMessage();
      await conn.writeMessage(message.type, message.data);
      // Disposing each message once echoed hands its memory back for the
      // next one: large messages then cost no fresh pages. Called directly,
      // as `using` costs ~0.3 us a message in Deno 2.9 (a third of a small
      // echo's time).
      message[Symbol.dispose]();
    }
  } catch (error) {
    // A peer that broke the protocol or a limit was told why in the close
    // frame; one line says so here.
    if (error instanceof ProtocolError) {
      console.error(`echo: ${error.message} (closed with ${error.code})`);
    } else if (
      !isCloseError(error) && !(error instanceof ConnectionClosedError)
    ) console.error("echo:", error);
  } finally {
    conn.close();
  }
}

/**
 * Builds the request handler: the page on `GET /`, an echo connection for
 * every WebSocket upgrade.
 *
 * @param options Compression and the connection hook.
 * @returns A handler for `serve()`.
 * @throws {TypeError} If the Upgrader refuses the options.
 */
export function createHandler(
  options: EchoOptions = {},
): ServeHandler {
  const upgrader = new Upgrader({
    enableCompression: options.compress,
    compressionLevel: options.compressionLevel,
    readLimit: READ_LIMIT,
  });
  return async (request) => {
    if (isWebSocketUpgrade(request)) {
      const conn = await upgrader.upgrade(request);
      // Started before the hook: `?.()` would skip evaluating its arguments.
      const done = echo(conn);
      options.onConnection?.(conn, done);
      return;
    }
    return servePage(request, page);
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
  return listen(options, createHandler(options));
}

const USAGE =
  "Usage: server.ts [--port N] [--hostname H] [--compress] [--compression-level L]";

if (import.meta.main) {
  const args = parseServerArgs(
    Deno.args,
    USAGE,
    {
      compress: { type: "boolean", default: false },
      "compression-level": { type: "string" },
    },
  );
  const compress = args.flags.compress === true;
  const level = args.flags["compression-level"] as string | undefined;
  if (level !== undefined && !/^-?[0-9]$/.test(level)) {
    exitWithUsage(
      `Cannot start: --compression-level must be gorilla's -2 to 9, got "${level}"`,
      USAGE,
    );
  }
  startServer({
    port: args.port,
    hostname: args.hostname,
    compress,
    compressionLevel: level === undefined ? undefined : Number(level),
    onListen: ({ hostname, port }) =>
      console.log(
        `Echo server on http://${hostname}:${port}/ (WebSocket on any path${
          compress ? ", permessage-deflate enabled" : ""
        })`,
      ),
  });
}
