/**
 * Autobahn testee server: echoes every message back, for the Autobahn
 * WebSocket conformance suite's `fuzzingclient`.
 *
 * Each path exercises a different part of the API, so the suite checks all
 * of them:
 *
 * - `/`  whole messages: `readMessage()` then `writeMessage()`;
 * - `/f` streaming: `nextReader()` copied chunk by chunk into `nextWriter()`,
 *   so a message is echoed while it is still arriving;
 * - `/p` prepared messages: each message is sent with `writePreparedMessage()`.
 *
 * permessage-deflate is enabled and text is validated as UTF-8 by the
 * connection itself (a bad message fails it with close code 1007).
 *
 * ```sh
 * deno task autobahn -- --port 9001
 * ```
 *
 * @module
 */
import {
  type Conn,
  isCloseError,
  PreparedMessage,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { parseServerArgs } from "../_cli.ts";
import { type ConnectionHook, listen, type ListenOptions } from "../_shared.ts";

/**
 * The suite's largest messages are 16 MiB (cases 9.x); the default read limit
 * would fail them.
 */
const READ_LIMIT = 64 * 1024 * 1024;

/** The three echo loops, by path. */
export const ECHO_PATHS = {
  "/": echoMessages,
  "/f": echoStreaming,
  "/p": echoPrepared,
} as const;

/** Options for {@linkcode createHandler}. */
export interface HandlerOptions extends ConnectionHook {
  /** Log every connection that ends with an error. */
  verbose?: boolean;
}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends HandlerOptions, ListenOptions {}

/**
 * Runs an echo loop until the connection ends, then closes it. A close from
 * the peer is the normal end; other failures are mostly the suite's test
 * cases doing their job, so they are logged only when asked.
 */
async function run(
  conn: Conn,
  loop: (conn: Conn) => Promise<never>,
  verbose: boolean,
) {
  conn.setReadLimit(READ_LIMIT);
  try {
    await loop(conn);
  } catch (error) {
    if (verbose && !isCloseError(error)) console.error("autobahn:", error);
  } finally {
    conn.close();
  }
}

/** `/`: whole messages in, whole messages out. */
async function echoMessages(conn: Conn): Promise<never> {
  for (;;) {
    const { type, data } = await conn.readMessage();
    await conn.writeMessage(type, data);
  }
}

/** `/f`: each message streamed from its reader into a writer. */
async function echoStreaming(conn: Conn): Promise<never> {
  const buffer = new Uint8Array(32 * 1024);
  for (;;) {
    const { type, reader } = await conn.nextReader();
    const writer = await conn.nextWriter(type);
    let n: number | null;
    while ((n = await reader.read(buffer)) !== null) {
      await writer.write(buffer.subarray(0, n));
    }
    await writer.close();
  }
}

/** `/p`: each message echoed as a prepared message. */
async function echoPrepared(conn: Conn): Promise<never> {
  for (;;) {
    const { type, data } = await conn.readMessage();
    await conn.writePreparedMessage(new PreparedMessage(type, data));
  }
}

/**
 * Builds the request handler: an echo loop for WebSocket upgrades on the
 * paths of {@linkcode ECHO_PATHS}, with every origin and compression allowed.
 *
 * @param options Logging and the connection hook.
 * @returns A handler for `serve()`.
 */
export function createHandler(options: HandlerOptions = {}): ServeHandler {
  const upgrader = new Upgrader({
    enableCompression: true,
    // The fuzzing client is not a browser: there is no origin to protect.
    checkOrigin: () => true,
  });
  return async (request) => {
    const { pathname } = new URL(request.url);
    if (!Object.hasOwn(ECHO_PATHS, pathname)) {
      return new Response("Not found\n", { status: 404 });
    }
    const conn = await upgrader.upgrade(request);
    const done = run(
      conn,
      ECHO_PATHS[pathname as keyof typeof ECHO_PATHS],
      options.verbose ?? false,
    );
    options.onConnection?.(conn, done);
    return;
  };
}

/**
 * Starts the testee server.
 *
 * @param options Where to listen, and the example's own options.
 * @returns The running server; `shutdown()` stops it.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(options: StartOptions): Server {
  return listen(options, createHandler(options));
}

if (import.meta.main) {
  const args = parseServerArgs(
    Deno.args,
    "Usage: server.ts [--port N] [--hostname H] [--verbose]",
    { verbose: { type: "boolean", default: false } },
  );
  startServer({
    port: args.port,
    hostname: args.hostname,
    verbose: args.flags.verbose === true,
    onListen: ({ hostname, port }) =>
      console.log(
        `Autobahn testee on ws://${hostname}:${port}/ (also /f and /p)`,
      ),
  });
}
