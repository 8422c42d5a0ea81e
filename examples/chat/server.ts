/**
 * Chat server: every line a client sends is broadcast to every connected
 * client, the sender included.
 *
 * The shape is gorilla's chat example, in TypeScript, with the library doing
 * what gorilla's example writes by hand:
 *
 * - a {@linkcode Hub} broadcasts each line through {@linkcode Topics}: one
 *   `PreparedMessage` per line, however many clients there are, each client
 *   with its own bounded queue; a client whose queue is full is dropped
 *   (closed with 1008) instead of slowing the others;
 * - each connection has one read loop, which hands lines to the hub;
 * - the Upgrader's keepalive pings a client that has been silent for
 *   `pingInterval` and drops it when it stays silent `pongTimeout` longer,
 *   so a peer that vanishes without a FIN is noticed.
 *
 * With `--redis URL` the hub publishes through Redis, so chat servers in
 * several processes (or on several machines) share one room; with
 * `--reuse-port` they can also share one port.
 *
 * ```sh
 * deno task chat            # then open http://127.0.0.1:8080/ in two tabs
 * deno task chat --port 8081 --redis redis://127.0.0.1:6379
 * ```
 *
 * @module
 */
import {
  type Broker,
  CLOSE_CODE,
  type Conn,
  ConnectionClosedError,
  isUnexpectedCloseError,
  type ServeHandler,
  type Server,
  Topics,
  Upgrader,
} from "../../mod.ts";
import { exitWithUsage, parseServerArgs } from "../_cli.ts";
import {
  type ConnectionHook,
  listen,
  type ListenOptions,
  servePage,
} from "../_shared.ts";

/** Size limits and keepalive timings of a chat server, with gorilla's defaults. */
export interface ChatOptions {
  /** Largest message accepted from a client, in bytes (default 512). */
  maxMessageSize?: number;
  /** Lines queued for a client before it counts as too slow (default 256). */
  sendQueueSize?: number;
  /** Silence after which a client is pinged, in ms (default 54 s). */
  pingInterval?: number;
  /** Time a pinged client has to answer, in ms (default 6 s). */
  pongTimeout?: number;
}

/** Options for {@linkcode createHandler}. */
export interface HandlerOptions extends ChatOptions, ConnectionHook {}

/** Options for {@linkcode startServer}. */
export interface StartOptions extends HandlerOptions, ListenOptions {
  /** Share the room with every chat server on this broker (Redis, say). */
  broker?: Broker;
}

const ROOM = "chat";
const decoder = new TextDecoder();

/** The room: every connected client, here and, with a broker, elsewhere. */
export class Hub {
  #topics: Topics;

  /**
   * Creates an empty room.
   *
   * @param options `sendQueueSize` (default 256) and a broker.
   */
  constructor(options: { sendQueueSize?: number; broker?: Broker } = {}) {
    this.#topics = new Topics({
      maxQueue: options.sendQueueSize ?? 256,
      broker: options.broker,
    });
  }

  /** The clients of this process receiving broadcasts. */
  get size(): number {
    return this.#topics.subscriberCount(ROOM);
  }

  /**
   * Adds a client; it receives every later broadcast.
   *
   * @param conn The client's connection.
   */
  join(conn: Conn): void {
    this.#topics.subscribe(conn, ROOM);
  }

  /**
   * Removes a client; safe to call more than once.
   *
   * @param conn The client's connection.
   */
  leave(conn: Conn): void {
    this.#topics.unsubscribe(conn, ROOM);
  }

  /**
   * Sends `line` to every client, encoding the frame once for all of them.
   *
   * @param line The text to send.
   */
  broadcast(line: string): void {
    this.#topics.publish(ROOM, line);
  }
}

/**
 * One client's session: joins the hub, hands each line it sends to the
 * hub, and leaves when the connection ends.
 *
 * @param hub The room.
 * @param conn The client's connection.
 * @returns Settles when the connection has ended; never rejects.
 */
export async function chat(hub: Hub, conn: Conn): Promise<void> {
  hub.join(conn);
  try {
    for (;;) {
      const { data } = await conn.readMessage();
      const line = decoder.decode(data).replaceAll(/[\r\n]+/g, " ").trim();
      if (line !== "") hub.broadcast(line);
    }
  } catch (error) {
    // Tabs closing (1001), pages calling close() with or without a code,
    // vanished peers and clients dropped as too slow (1008, closed here)
    // are all ordinary ends of a chat session.
    if (
      isUnexpectedCloseError(
        error,
        CLOSE_CODE.NormalClosure,
        CLOSE_CODE.GoingAway,
        CLOSE_CODE.NoStatusReceived,
        CLOSE_CODE.AbnormalClosure,
        CLOSE_CODE.PolicyViolation,
      ) && !(error instanceof ConnectionClosedError)
    ) {
      console.error("chat: read:", error);
    }
  } finally {
    hub.leave(conn);
    conn.close();
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
  // gorilla's timings: a ping every 54 s, a pong within 60 s of the last.
  const upgrader = new Upgrader({
    readLimit: options.maxMessageSize ?? 512,
    pingInterval: options.pingInterval ?? 54_000,
    pongTimeout: options.pongTimeout ?? 6_000,
  });
  return async (request) => {
    const { pathname } = new URL(request.url);
    if (pathname === "/ws") {
      const conn = await upgrader.upgrade(request);
      const done = chat(hub, conn);
      options.onConnection?.(conn, done);
      return;
    }
    return servePage(request, page);
  };
}

/**
 * Starts a chat server with a fresh hub.
 *
 * @param options Where to listen, limits, a broker and the connection hook.
 * @returns The running server (`shutdown()` stops it) and its hub.
 * @throws {RangeError} If a limit is not a valid size or time.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 */
export function startServer(
  options: StartOptions,
): { server: Server; hub: Hub } {
  const hub = new Hub({
    sendQueueSize: options.sendQueueSize,
    broker: options.broker,
  });
  return { server: listen(options, createHandler(hub, options)), hub };
}

const USAGE =
  "Usage: server.ts [--port N] [--hostname H] [--redis URL] [--reuse-port]";

/**
 * Connects the Redis broker, loaded only now: it comes from npm, and a chat
 * server on its own must start without npm. A computed specifier, so that
 * Deno does not fetch it ahead of time.
 */
async function connectRedis(url: string): Promise<Broker> {
  const specifier = new URL("./redis.ts", import.meta.url).href;
  const { connectRedisBroker }: typeof import("./redis.ts") = await import(
    specifier
  );
  try {
    return await connectRedisBroker(url);
  } catch (error) {
    exitWithUsage(`Cannot start: ${(error as Error).message}`, USAGE);
  }
}

if (import.meta.main) {
  const args = parseServerArgs(Deno.args, USAGE, {
    redis: { type: "string" },
    "reuse-port": { type: "boolean", default: false },
  });
  const redis = args.flags.redis as string | undefined;
  const broker = redis === undefined ? undefined : await connectRedis(redis);
  startServer({
    port: args.port,
    hostname: args.hostname,
    broker,
    reusePort: args.flags["reuse-port"] === true,
    onListen: ({ hostname, port }) =>
      console.log(
        `Chat on http://${hostname}:${port}/${
          redis === undefined ? "" : ` (sharing the room through ${redis})`
        }`,
      ),
  });
}
