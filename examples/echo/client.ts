/**
 * Echo client, as gorilla's `examples/echo/client.go`: connects to the echo
 * server, sends the time every second and prints what comes back. On Ctrl+C
 * it sends a close frame (1000, normal closure) and waits up to a second for
 * the server's close before it exits.
 *
 * ```sh
 * deno task echo:client
 * deno task echo:client -- --url ws://127.0.0.1:9000/ws --compress
 * ```
 *
 * @module
 */
import type { Conn } from "../../conn.ts";
import { Dialer } from "../../dialer.ts";
import { formatCloseMessage, MESSAGE_TYPE } from "../../frame.ts";
import { parseFlags } from "../_cli.ts";

/** Options for {@linkcode runClient}. */
export interface ClientOptions {
  /** The echo server's WebSocket URL. */
  url: string;
  /** Aborting it closes the connection with 1000 (Ctrl+C in the CLI). */
  signal: AbortSignal;
  /** Offer permessage-deflate (RFC 7692). */
  compress?: boolean;
  /** Milliseconds between two messages (default 1000). */
  interval?: number;
  /** Where lines go (default `console.log`). */
  log?: (line: string) => void;
}

/** How long to wait for the server's close after sending ours. */
const CLOSE_WAIT_MS = 1000;

/**
 * Runs the client until `signal` aborts or the server goes away. Resolves
 * once the connection is closed.
 */
export async function runClient(options: ClientOptions): Promise<void> {
  const log = options.log ?? console.log;
  const dialer = new Dialer({
    handshakeTimeout: 10_000,
    enableCompression: options.compress,
  });
  const { conn } = await dialer.dial(options.url, { signal: options.signal });
  log(
    `connected to ${options.url}${
      conn.compression ? " (permessage-deflate)" : ""
    }`,
  );
  const done = readLoop(conn, log);
  const ticker = setInterval(() => {
    conn.writeMessage(MESSAGE_TYPE.Text, new Date().toISOString()).catch(
      (error) => log(`write: ${error.message}`),
    );
  }, options.interval ?? 1000);
  const interrupted = new Promise<void>((resolve) => {
    if (options.signal.aborted) resolve();
    options.signal.addEventListener("abort", () => resolve(), { once: true });
  });
  try {
    if (
      await Promise.race([
        done.then(() => false),
        interrupted.then(() => true),
      ])
    ) {
      log("interrupt");
      // Cleanly close by sending a close frame, then wait for the server to
      // close its side; the read loop ends when its close frame arrives.
      await conn.writeControl(
        MESSAGE_TYPE.Close,
        formatCloseMessage(1000, ""),
        {
          deadline: new Date(Date.now() + CLOSE_WAIT_MS),
        },
      );
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        done,
        new Promise((resolve) => timer = setTimeout(resolve, CLOSE_WAIT_MS)),
      ]);
      clearTimeout(timer);
    }
  } finally {
    clearInterval(ticker);
    conn.close();
    await done;
  }
}

/**
 * Prints every message until the connection ends, then why it ended (the
 * server's close frame after an interrupt, as gorilla's client logs it).
 * Never rejects.
 */
async function readLoop(
  conn: Conn,
  log: (line: string) => void,
): Promise<void> {
  try {
    for (;;) {
      const { data } = await conn.readMessage();
      log(`recv: ${new TextDecoder().decode(data)}`);
    }
  } catch (error) {
    log(`read: ${(error as Error).message}`);
  }
}

const USAGE =
  "Usage: deno task echo:client [--url ws://127.0.0.1:8080/ws] [--compress]";

if (import.meta.main) {
  const { values } = parseFlags(Deno.args, USAGE, {
    url: { type: "string", default: "ws://127.0.0.1:8080/ws" },
    compress: { type: "boolean", default: false },
  });
  const url = values.url as string;
  const compress = values.compress === true;
  const controller = new AbortController();
  const onInterrupt = () => controller.abort();
  Deno.addSignalListener("SIGINT", onInterrupt);
  try {
    await runClient({ url, compress, signal: controller.signal });
  } catch (error) {
    console.error(`Cannot run the echo client: ${(error as Error).message}`);
    Deno.exitCode = 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
  }
}
