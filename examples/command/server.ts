/**
 * Command server: bridges each WebSocket connection to its own child process.
 *
 * Every message received becomes a line on the process's standard input;
 * every line the process writes to standard output (or standard error)
 * becomes a text message. When the process exits the connection is closed
 * with its exit status; when the connection goes the process is stopped:
 * its standard input is closed, then it is sent SIGTERM, then SIGKILL.
 *
 * ```sh
 * deno task command                    # a Deno REPL in the browser
 * deno task command -- --port 9000 cat # any command and its arguments
 * ```
 *
 * The server listens on 127.0.0.1 by default: whoever can reach it can run
 * the command.
 *
 * @module
 */
import {
  CLOSE_CODE,
  type Conn,
  MESSAGE_TYPE,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { exitWithUsage, parsePort } from "../_cli.ts";
import {
  type ConnectionHook,
  deadline,
  listen,
  type ListenOptions,
  servePage,
} from "../_shared.ts";

/** What to run for each connection, and how long to wait for it. */
export interface CommandOptions {
  /** The program to run (a path, or a name looked up in `PATH`). */
  command: string;
  /** Its arguments. */
  args?: string[];
  /** Time allowed to write one line to the peer, in ms (default 10 s). */
  writeWait?: number;
  /** Largest message accepted from the peer, in bytes (default 8 KiB). */
  maxMessageSize?: number;
  /**
   * How long the process gets to exit by itself once its standard input is
   * closed, and again after SIGTERM, in ms (default 1 s).
   */
  killGrace?: number;
  /** Called with the exit status of every process once it has exited. */
  onExit?: (status: Deno.CommandStatus) => void;
}

/** Options for {@linkcode createHandler}. */
export interface HandlerOptions extends CommandOptions, ConnectionHook {}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends HandlerOptions, ListenOptions {}

const encoder = new TextEncoder();
const NEWLINE = encoder.encode("\n");

/** Waits for `promise` at most `ms`; resolves false on timeout. */
async function settlesWithin(promise: Promise<unknown>, ms: number) {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Splits a byte stream into lines (without their `\n` or `\r\n`), the last
 * line included even when it has no newline.
 */
async function* lines(stream: ReadableStream<Uint8Array>) {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    rest += chunk;
    let newline: number;
    while ((newline = rest.indexOf("\n")) !== -1) {
      yield rest.slice(0, newline).replace(/\r$/, "");
      rest = rest.slice(newline + 1);
    }
  }
  if (rest !== "") yield rest;
}

/**
 * Runs one child process for `conn` and bridges the two until either side
 * ends.
 *
 * @param conn A server connection.
 * @param options The command and its limits.
 * @returns The exit status, or undefined when the process could not be
 * started (the peer is told why, with close code 1011); never rejects.
 */
export async function bridge(
  conn: Conn,
  options: CommandOptions,
): Promise<Deno.CommandStatus | undefined> {
  const writeWait = options.writeWait ?? 10_000;
  const killGrace = options.killGrace ?? 1_000;
  conn.setReadLimit(options.maxMessageSize ?? 8192);

  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(options.command, {
      args: options.args ?? [],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      // Programs that colour their output (deno repl) would send escape codes.
      env: { NO_COLOR: "1" },
    }).spawn();
  } catch (error) {
    console.error("command: cannot start", options.command, error);
    await conn.closeGracefully(
      CLOSE_CODE.InternalServerErr,
      "Cannot start the command",
    );
    return undefined;
  }

  // Process → socket: stdout and stderr lines become text messages.
  const pumpOut = async (stream: ReadableStream<Uint8Array>) => {
    try {
      for await (const line of lines(stream)) {
        conn.setWriteDeadline(deadline(writeWait));
        await conn.writeMessage(MESSAGE_TYPE.Text, line);
      }
    } catch {
      // The connection is gone. Leaving the loop cancels the pipe, so the
      // process is not blocked on a full one; pumpIn sees the closed
      // connection too and stops the process.
    }
  };

  // Socket → process: each message becomes a line on stdin.
  const pumpIn = async () => {
    const stdin = child.stdin.getWriter();
    try {
      for (;;) {
        const { data } = await conn.readMessage();
        await stdin.write(data);
        await stdin.write(NEWLINE);
      }
    } catch {
      // The peer closed, the connection failed, or the process stopped
      // reading its input: in every case the process is no longer wanted.
    } finally {
      await stdin.close().catch(() => {});
    }
  };

  const output = Promise.all([pumpOut(child.stdout), pumpOut(child.stderr)]);
  const input = pumpIn();

  // Whichever ends first: the process, or the socket's reader.
  const exited = await Promise.race([
    child.status.then(() => true),
    input.then(() => false),
  ]);
  if (!exited) {
    // Closing stdin ends well-behaved programs; the others get signals.
    for (const signal of ["SIGTERM", "SIGKILL"] as const) {
      if (await settlesWithin(child.status, killGrace)) break;
      try {
        child.kill(signal);
      } catch {
        break; // It exited in between.
      }
    }
  }
  const status = await child.status;
  await output;
  options.onExit?.(status);
  if (exited) {
    const reason = status.signal !== null
      ? `Process killed by ${status.signal}`
      : `Process exited with code ${status.code}`;
    await conn.closeGracefully(CLOSE_CODE.NormalClosure, reason);
  }
  conn.close();
  await input;
  return status;
}

const page = new URL("./home.html", import.meta.url);

/**
 * Builds the request handler: the page on `GET /`, one process per
 * WebSocket upgrade on `/ws`.
 *
 * @param options The command, its limits and the connection hook.
 * @returns A handler for `serve()`.
 */
export function createHandler(
  options: HandlerOptions,
): ServeHandler {
  const upgrader = new Upgrader();
  return async (request) => {
    const { pathname } = new URL(request.url);
    if (pathname === "/ws") {
      const conn = await upgrader.upgrade(request);
      const done = bridge(conn, options).then(() => {});
      options.onConnection?.(conn, done);
      return;
    }
    return servePage(request, page);
  };
}

/**
 * Starts the command server.
 *
 * @param options Where to listen, and the example's own options.
 * @returns The running server; `shutdown()` stops it.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(options: StartOptions): Server {
  return listen(options, createHandler(options));
}

const USAGE =
  "Usage: server.ts [--port N] [--hostname H] [--] [command [args...]]";

/**
 * Parses `[--port N] [--hostname H] [--] [command args...]`. Options stop at
 * the first word that is not one, so the command's own flags pass through;
 * `--` is skipped wherever it appears before the command (`deno task` passes
 * its own `--` on).
 */
function parseCommandLine(argv: string[]) {
  let port = 8080;
  let hostname = "127.0.0.1";
  let i = 0;
  for (; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    if (flag === "--") continue;
    if (flag !== "--port" && flag !== "--hostname") break;
    const value = inline ?? argv[++i];
    if (value === undefined) throw new TypeError(`${flag} needs a value`);
    if (flag === "--port") port = parsePort(value);
    else hostname = value;
  }
  // Without a command: Deno's own REPL, which runs wherever this does.
  const [command, ...args] = i < argv.length
    ? argv.slice(i)
    : [Deno.execPath(), "repl"];
  return { port, hostname, command, args };
}

if (import.meta.main) {
  let parsed;
  try {
    parsed = parseCommandLine(Deno.args);
  } catch (error) {
    exitWithUsage(`Cannot start: ${(error as Error).message}`, USAGE);
  }
  const commandLine = [parsed.command, ...parsed.args].join(" ");
  startServer({
    ...parsed,
    onListen: ({ hostname, port }) =>
      console.log(
        `Running "${commandLine}" for each connection on http://${hostname}:${port}/`,
      ),
    onExit: (status) =>
      console.log(
        `command: process exited with ${
          status.signal ?? `code ${status.code}`
        }`,
      ),
  });
}
