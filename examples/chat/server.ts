/**
 * Chat server: every line a client sends is broadcast to every connected
 * client, the sender included.
 *
 * The shape is gorilla's chat example, in TypeScript:
 *
 * - a {@linkcode Hub} holds the clients and broadcasts each line as one
 *   `PreparedMessage`, so the frame is built once however many clients
 *   there are;
 * - each client has a read loop (the only reader of its connection) and a
 *   write loop (the only writer) fed by a bounded queue;
 * - the Upgrader's keepalive pings a client that has been silent for
 *   `pingInterval` and drops it when it stays silent `pongTimeout` longer,
 *   so a peer that vanishes without a FIN is noticed (gorilla's example
 *   writes this loop by hand);
 * - a client whose queue is full is dropped instead of slowing the others.
 *
 * ```sh
 * deno task chat            # then open http://127.0.0.1:8080/ in two tabs
 * ```
 *
 * @module
 */
import {
  CLOSE_CODE,
  type Conn,
  formatCloseMessage,
  isUnexpectedCloseError,
  MESSAGE_TYPE,
  PreparedMessage,
  type ServeHandler,
  type Server,
  Upgrader,
} from "../../mod.ts";
import { parseServerArgs } from "../_cli.ts";
import {
  type ConnectionHook,
  deadline,
  listen,
  type ListenOptions,
  servePage,
} from "../_shared.ts";

/** Timing and size limits of a chat server, with gorilla's defaults. */
export interface ChatOptions {
  /** Largest message accepted from a client, in bytes (default 512). */
  maxMessageSize?: number;
  /** Messages queued for a client before it counts as too slow (default 256). */
  sendQueueSize?: number;
  /** Time allowed to write one message, in ms (default 10 s). */
  writeWait?: number;
  /** Silence after which a client is pinged, in ms (default 54 s). */
  pingInterval?: number;
  /** Time a pinged client has to answer, in ms (default 6 s). */
  pongTimeout?: number;
}

/** Options for {@linkcode createHandler}. */
export interface HandlerOptions extends ChatOptions, ConnectionHook {}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends HandlerOptions, ListenOptions {}

type Limits = Required<ChatOptions>;

function limits(options: ChatOptions): Limits {
  // gorilla's timings: a ping every 54 s, a pong within 60 s of the last.
  return {
    maxMessageSize: options.maxMessageSize ?? 512,
    sendQueueSize: options.sendQueueSize ?? 256,
    writeWait: options.writeWait ?? 10_000,
    pingInterval: options.pingInterval ?? 54_000,
    pongTimeout: options.pongTimeout ?? 6_000,
  };
}

const decoder = new TextDecoder();

/**
 * The set of connected clients. Broadcasting never waits for anyone: it only
 * appends to each client's queue, and a client whose queue is full is dropped.
 */
export class Hub {
  #clients = new Set<Client>();

  /**
   * The number of clients receiving broadcasts: a dropped client no longer
   * counts, even while its connection is still closing.
   */
  get size(): number {
    return this.#clients.size;
  }

  /**
   * Adds a client; it receives every later broadcast.
   *
   * @param client The client to add.
   */
  register(client: Client): void {
    this.#clients.add(client);
  }

  /**
   * Removes a client; safe to call more than once.
   *
   * @param client The client to remove.
   */
  unregister(client: Client): void {
    this.#clients.delete(client);
  }

  /**
   * Sends `line` to every client, encoding the frame once for all of them.
   *
   * @param line The text to send.
   */
  broadcast(line: string): void {
    const message = new PreparedMessage(MESSAGE_TYPE.Text, line);
    for (const client of this.#clients) {
      if (!client.enqueue(message)) {
        this.#clients.delete(client);
        client.drop();
      }
    }
  }
}

/** One connected client: its connection, its queue and its two loops. */
export class Client {
  #hub: Hub;
  #conn: Conn;
  #limits: Limits;
  #queue: PreparedMessage[] = [];
  #wake: (() => void) | undefined;
  #dropped = false;
  #done = false;

  /**
   * Creates a client; {@linkcode Client.run} starts it.
   *
   * @param hub The hub it joins.
   * @param conn Its connection.
   * @param options Its limits.
   */
  constructor(hub: Hub, conn: Conn, options: ChatOptions = {}) {
    this.#hub = hub;
    this.#conn = conn;
    this.#limits = limits(options);
  }

  /**
   * Queues a message for the write loop.
   *
   * @param message The message to send.
   * @returns False, queuing nothing, when the queue is full: the client is
   * not keeping up.
   */
  enqueue(message: PreparedMessage): boolean {
    if (this.#done) return true; // Leaving anyway: nothing to drop.
    if (this.#queue.length >= this.#limits.sendQueueSize) return false;
    this.#queue.push(message);
    this.#signal();
    return true;
  }

  /** Ends the client: the write loop sends a close frame and hangs up. */
  drop(): void {
    this.#dropped = true;
    this.#queue.length = 0;
    this.#signal();
  }

  /**
   * Registers the client and runs both loops until the connection ends;
   * the client leaves the hub once both have stopped.
   *
   * @returns Settles when both loops have stopped; never rejects.
   */
  async run(): Promise<void> {
    this.#hub.register(this);
    try {
      await Promise.all([this.#readLoop(), this.#writeLoop()]);
    } finally {
      this.#hub.unregister(this);
    }
  }

  #signal(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  // The only reader of the connection; it also reads the pongs that keep
  // the connection alive (a peer that stops answering fails the read).
  async #readLoop(): Promise<void> {
    const conn = this.#conn;
    try {
      for (;;) {
        const { data } = await conn.readMessage();
        const line = decoder.decode(data).replaceAll(/[\r\n]+/g, " ").trim();
        if (line !== "") this.#hub.broadcast(line);
      }
    } catch (error) {
      // Tabs closing (1001), pages calling close() with or without a code,
      // and vanished peers are all ordinary ends of a chat session.
      if (
        isUnexpectedCloseError(
          error,
          CLOSE_CODE.NormalClosure,
          CLOSE_CODE.GoingAway,
          CLOSE_CODE.NoStatusReceived,
          CLOSE_CODE.AbnormalClosure,
        )
      ) {
        console.error("chat: read:", error);
      }
    } finally {
      this.#done = true;
      this.#signal();
      conn.close();
    }
  }

  // The only writer of data: queued broadcasts, and the close frame when
  // the hub drops the client.
  async #writeLoop(): Promise<void> {
    const conn = this.#conn;
    const { writeWait } = this.#limits;
    try {
      while (!this.#done) {
        if (this.#dropped) {
          await conn.writeControl(
            MESSAGE_TYPE.Close,
            formatCloseMessage(CLOSE_CODE.PolicyViolation, "too slow"),
            { deadline: deadline(writeWait) },
          );
          return;
        }
        const message = this.#queue.shift();
        if (message !== undefined) {
          conn.setWriteDeadline(deadline(writeWait));
          await conn.writePreparedMessage(message);
        } else if (!this.#dropped && !this.#done) {
          await new Promise<void>((resolve) => this.#wake = resolve);
        }
      }
    } catch {
      // A failed write ends the client; closing the connection below ends
      // the read loop too.
    } finally {
      this.#done = true;
      conn.close();
    }
  }
}

const page = new URL("./home.html", import.meta.url);

/**
 * Builds the request handler: the chat page on `GET /`, a chat client for
 * each WebSocket upgrade on `/ws`, all sharing `hub`.
 *
 * @param hub The hub every client joins.
 * @param options Limits and the connection hook.
 * @returns A handler for `serve()`.
 * @throws {RangeError} If a limit is not a valid size or time.
 */
export function createHandler(
  hub: Hub,
  options: HandlerOptions = {},
): ServeHandler {
  const { maxMessageSize, pingInterval, pongTimeout } = limits(options);
  const upgrader = new Upgrader({
    readLimit: maxMessageSize,
    pingInterval,
    pongTimeout,
  });
  return async (request) => {
    const { pathname } = new URL(request.url);
    if (pathname === "/ws") {
      const conn = await upgrader.upgrade(request);
      const done = new Client(hub, conn, options).run();
      options.onConnection?.(conn, done);
      return;
    }
    return servePage(request, page);
  };
}

/**
 * Starts a chat server with a fresh hub.
 *
 * @param options Where to listen, limits and the connection hook.
 * @returns The running server (`shutdown()` stops it) and its hub.
 * @throws {RangeError} If a limit is not a valid size or time.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(
  options: StartOptions,
): { server: Server; hub: Hub } {
  const hub = new Hub();
  return { server: listen(options, createHandler(hub, options)), hub };
}

if (import.meta.main) {
  const args = parseServerArgs(
    Deno.args,
    "Usage: server.ts [--port N] [--hostname H]",
  );
  startServer({
    port: args.port,
    hostname: args.hostname,
    onListen: ({ hostname, port }) =>
      console.log(`Chat on http://${hostname}:${port}/`),
  });
}
