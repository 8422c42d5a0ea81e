/**
 * File watch server: shows a file in the browser and pushes its contents to
 * the page whenever it changes.
 *
 * Like gorilla's filewatch example it polls the file's metadata rather than
 * using `Deno.watchFs`: polling also follows editors that save by writing a
 * new file and renaming it over the old one, and a file that is deleted and
 * created again. Each connection has a writer loop (file updates and pings)
 * and a reader loop (pongs; the page sends nothing else) with a read deadline
 * pushed back by every pong.
 *
 * ```sh
 * deno task filewatch notes.txt    # then open http://127.0.0.1:8080/
 * ```
 *
 * @module
 */
import {
  type Conn,
  MESSAGE_TYPE,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { exitWithUsage, parseServerArgs } from "../_cli.ts";
import {
  type ConnectionHook,
  deadline,
  keepalive,
  type KeepaliveOptions,
  listen,
  type ListenOptions,
  servePage,
} from "../_shared.ts";

/** What to watch and how often, with the keepalive timings. */
export interface FilewatchOptions extends KeepaliveOptions {
  /** The file to watch. */
  path: string;
  /** How often to check the file, in ms (default 500). */
  pollInterval?: number;
}

/** Options for {@linkcode createHandler}. */
export interface HandlerOptions extends FilewatchOptions, ConnectionHook {}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends HandlerOptions, ListenOptions {}

/**
 * What the page receives, as JSON text: the file's contents, or why it could
 * not be read.
 */
export type Update =
  | { name: string; contents: string }
  | { name: string; error: string };

/**
 * Reads the file if it changed since `version` (its modification time and
 * size, which together catch every save but one within the same millisecond
 * that keeps the size). Returns the new version and what to send, if anything.
 */
async function readIfChanged(
  path: string,
  version: string,
): Promise<{ version: string; update?: Update }> {
  try {
    const info = await Deno.stat(path);
    const current = `${info.mtime?.getTime()}:${info.size}`;
    if (current === version) return { version };
    const contents = await Deno.readTextFile(path);
    return { version: current, update: { name: path, contents } };
  } catch (error) {
    // Report an error once, not on every poll.
    const message = error instanceof Error ? error.message : String(error);
    const current = `error:${message}`;
    if (current === version) return { version };
    return { version: current, update: { name: path, error: message } };
  }
}

/**
 * Serves one page's connection until it ends: sends the file now and after
 * every change, pings, and reads pongs.
 *
 * @param conn A server connection.
 * @param options The file and the timings.
 * @returns Settles when the connection has ended; never rejects.
 * @throws {RangeError} If `pingPeriod` is not less than `pongWait` (thrown
 * at once, before the connection is touched).
 */
export function watch(
  conn: Conn,
  options: FilewatchOptions,
): Promise<void> {
  const timings = keepalive(options, "file watch");
  return watchLoops(conn, options.path, options.pollInterval ?? 500, timings);
}

async function watchLoops(
  conn: Conn,
  path: string,
  pollInterval: number,
  { writeWait, pongWait, pingPeriod }: Required<KeepaliveOptions>,
): Promise<void> {
  const stop = new AbortController();

  // The reader: the page sends nothing but pongs (and the close frame), and
  // reading is what runs the pong handler.
  const reader = (async () => {
    conn.setReadLimit(512);
    conn.setReadDeadline(deadline(pongWait));
    conn.setPongHandler(() => conn.setReadDeadline(deadline(pongWait)));
    try {
      for (;;) await conn.readMessage();
    } catch {
      // Closed by the page, by the deadline, or by the writer below.
    } finally {
      stop.abort();
    }
  })();

  let timer: ReturnType<typeof setTimeout> | undefined;
  let wake: (() => void) | undefined;
  stop.signal.addEventListener("abort", () => wake?.(), { once: true });
  try {
    let version = "";
    let nextPing = Date.now() + pingPeriod;
    while (!stop.signal.aborted) {
      const result = await readIfChanged(path, version);
      version = result.version;
      if (result.update !== undefined) {
        conn.setWriteDeadline(deadline(writeWait));
        await conn.writeMessage(
          MESSAGE_TYPE.Text,
          JSON.stringify(result.update),
        );
      }
      if (Date.now() >= nextPing) {
        nextPing = Date.now() + pingPeriod;
        await conn.writeControl(MESSAGE_TYPE.Ping, new Uint8Array(), {
          deadline: deadline(writeWait),
        });
      }
      await new Promise<void>((resolve) => {
        wake = resolve;
        timer = setTimeout(resolve, pollInterval);
      });
      clearTimeout(timer);
    }
  } catch {
    // A write failed: the connection is unusable.
  } finally {
    clearTimeout(timer);
    conn.close();
    await reader;
  }
}

const page = new URL("./home.html", import.meta.url);

/**
 * Builds the request handler: the page on `GET /`, a watcher for each
 * WebSocket upgrade on `/ws`.
 *
 * @param options The file, the timings and the connection hook.
 * @returns A handler for `serve()`.
 * @throws {RangeError} If `pingPeriod` is not less than `pongWait`.
 */
export function createHandler(
  options: HandlerOptions,
): ServeHandler {
  keepalive(options, "file watch"); // fail at start-up, not on the first connection
  const upgrader = new Upgrader();
  return async (request) => {
    const { pathname } = new URL(request.url);
    if (pathname === "/ws") {
      const conn = await upgrader.upgrade(request);
      // Started before the hook: `?.()` would skip evaluating its arguments.
      const done = watch(conn, options);
      options.onConnection?.(conn, done);
      return;
    }
    return servePage(request, page);
  };
}

/**
 * Starts the file watch server.
 *
 * @param options Where to listen, and the example's own options.
 * @returns The running server; `shutdown()` stops it.
 * @throws {RangeError} If `pingPeriod` is not less than `pongWait`.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(options: StartOptions): Server {
  return listen(options, createHandler(options));
}

if (import.meta.main) {
  const usage =
    "Usage: server.ts [--port N] [--hostname H] [--interval MS] FILE";
  const args = parseServerArgs(
    Deno.args,
    usage,
    { interval: { type: "string", default: "500" } },
    true,
  );
  const pollInterval = Number(args.flags.interval);
  if (args.positionals.length !== 1) {
    exitWithUsage("Cannot start: name exactly one file to watch", usage);
  }
  if (!(pollInterval > 0)) {
    exitWithUsage(
      `Cannot start: --interval must be a positive number of ms, got "${args.flags.interval}"`,
      usage,
    );
  }
  const path = args.positionals[0];
  startServer({
    port: args.port,
    hostname: args.hostname,
    path,
    pollInterval,
    onListen: ({ hostname, port }) =>
      console.log(`Watching ${path} on http://${hostname}:${port}/`),
  });
}
