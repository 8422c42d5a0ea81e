/**
 * Topic pub/sub over {@linkcode Conn}s, as Bun's `ws.subscribe(topic)` and
 * `server.publish(topic, data)`: connections subscribe to named topics, and a
 * publish reaches every subscriber of its topic. The frame is built once per
 * publish ({@linkcode PreparedMessage}, compressed once per setting), however
 * many subscribers there are.
 *
 * Publishing never waits for a subscriber: each has a bounded queue written
 * in order, and one whose queue is full is too slow to keep. It is
 * unsubscribed and closed with 1008 (policy violation), so it can neither
 * grow the server's memory nor slow the others.
 *
 * With a {@linkcode Broker}, a publish also reaches the subscribers of other
 * processes and machines that use the same broker (a Redis one is in
 * `@denows/websocket/redis`). Local delivery never depends on it: when the
 * broker fails, local subscribers still get every message and the failure is
 * reported to `onBrokerError`.
 *
 * @example A room that every connection joins
 * ```ts title="Publishing to a topic"
 * import assert from "node:assert/strict";
 * import { Dialer, MESSAGE_TYPE, serve, Topics, Upgrader } from "@denows/websocket";
 *
 * const topics = new Topics();
 * const upgrader = new Upgrader();
 * await using server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
 *   const conn = await upgrader.upgrade(request);
 *   topics.subscribe(conn, "room"); // until the connection closes
 *   for await (const { data } of conn) {
 *     topics.publish("room", data, { type: MESSAGE_TYPE.Text, exclude: conn });
 *   }
 * });
 *
 * const url = `ws://127.0.0.1:${server.addr.port}/`;
 * const { conn: alice } = await new Dialer().dial(url);
 * const { conn: bob } = await new Dialer().dial(url);
 * while (topics.subscriberCount("room") < 2) await new Promise((r) => setTimeout(r, 5));
 * await alice.writeMessage(MESSAGE_TYPE.Text, "hi bob");
 * assert.equal(new TextDecoder().decode((await bob.readMessage()).data), "hi bob");
 * await Promise.all([alice.closeGracefully(), bob.closeGracefully()]);
 * ```
 *
 * @module
 */

import { type Conn, type DataMessageType, PreparedMessage } from "./conn.ts";
import { CLOSE_CODE, MESSAGE_TYPE } from "./frame.ts";
import { onClosed } from "./_close_watch.ts";

/**
 * Carries published messages between processes (and machines): every
 * process's {@linkcode Topics} publishes through it and subscribes to the
 * topics its connections subscribe to. Payloads are opaque bytes; Topics
 * puts its own envelope around each message, so a process can tell its own
 * messages apart when the broker echoes them back.
 */
export interface Broker {
  /** Sends `payload` to every process subscribed to `topic`. */
  publish(topic: string, payload: Uint8Array): Promise<void>;
  /**
   * Delivers every later message of `topic` to `onMessage`, until
   * {@linkcode Broker.unsubscribe}. Subscriptions survive reconnections.
   */
  subscribe(
    topic: string,
    onMessage: (payload: Uint8Array) => void,
  ): Promise<void>;
  /** Stops delivering `topic`. */
  unsubscribe(topic: string): Promise<void>;
}

/** Options for {@linkcode Topics}. */
export interface TopicsOptions {
  /**
   * Messages waiting for one subscriber before it counts as too slow and is
   * dropped (default 256).
   */
  maxQueue?: number;
  /** Also publish through this broker to other processes. */
  broker?: Broker;
  /**
   * Called when the broker fails to publish or subscribe. Default: log to
   * stderr, once until the broker works again.
   */
  onBrokerError?: (error: unknown) => void;
}

/** Options for {@linkcode Topics.publish}. */
export interface PublishOptions {
  /** Text or binary (default: text for a string, binary for bytes). */
  type?: DataMessageType;
  /** A connection that does not get this message (its sender, say). */
  exclude?: Conn;
}

const DEFAULT_MAX_QUEUE = 256;
/** How long a failed broker subscription waits before it is tried again. */
const SUBSCRIBE_RETRY_MS = 1000;
/** How long a dropped subscriber's close frame may take. */
const DROP_CLOSE_TIMEOUT = 1000;
/** Envelope: an 8-byte origin, one byte of message type, the payload. */
const ORIGIN_BYTES = 8;
const encoder = new TextEncoder();

/** One connection's queue and its subscriptions. */
class Subscriber {
  readonly conn: Conn;
  readonly topics = new Set<string>();
  #queue: PreparedMessage[] = [];
  #writing = false;

  constructor(conn: Conn) {
    this.conn = conn;
  }

  /** Queues `message`; false when the queue is full (too slow). */
  enqueue(message: PreparedMessage, maxQueue: number): boolean {
    if (this.#queue.length >= maxQueue) return false;
    this.#queue.push(message);
    if (!this.#writing) this.#write();
    return true;
  }

  /** Writes the queue in order; stops for good when a write fails. */
  async #write(): Promise<void> {
    this.#writing = true;
    try {
      for (let next; (next = this.#queue.shift()) !== undefined;) {
        await this.conn.writePreparedMessage(next);
      }
      this.#writing = false;
    } catch {
      // The connection failed or was closed: its reader sees why. The
      // queue is dropped and nothing more is written.
      this.#queue.length = 0;
    }
  }

  /** Forgets what is queued: the subscriber is being dropped. */
  clear(): void {
    this.#queue.length = 0;
  }
}

/**
 * Topics that connections subscribe to and messages are published to (see
 * the module docs). One instance serves any number of connections.
 */
export class Topics {
  readonly #maxQueue: number;
  readonly #broker: Broker | undefined;
  readonly #onBrokerError: (error: unknown) => void;
  readonly #byTopic = new Map<string, Set<Subscriber>>();
  readonly #byConn = new Map<Conn, Subscriber>();
  /** Connections whose closing already unsubscribes them. */
  readonly #watched = new WeakSet<Conn>();
  /** Identifies this instance's messages when the broker echoes them. */
  readonly #origin = crypto.getRandomValues(new Uint8Array(ORIGIN_BYTES));
  #brokerFailing = false;

  /**
   * Creates an empty set of topics.
   *
   * @param options Queue bound, broker and its error hook.
   * @throws {RangeError} `maxQueue` is not a positive integer.
   * @throws {TypeError} `broker` lacks `publish`, `subscribe` or
   * `unsubscribe`.
   */
  constructor(options: TopicsOptions = {}) {
    const maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    if (!Number.isSafeInteger(maxQueue) || maxQueue <= 0) {
      throw new RangeError(
        `Cannot create topics: maxQueue must be a positive integer, got ${maxQueue}`,
      );
    }
    const broker = options.broker;
    if (
      broker !== undefined &&
      !["publish", "subscribe", "unsubscribe"].every((name) =>
        typeof (broker as unknown as Record<string, unknown>)[name] ===
          "function"
      )
    ) {
      throw new TypeError(
        "Cannot create topics: broker must have publish(), subscribe() and unsubscribe()",
      );
    }
    this.#maxQueue = maxQueue;
    this.#broker = broker;
    this.#onBrokerError = options.onBrokerError ?? ((error) => {
      if (this.#brokerFailing) return;
      console.error("Topics: the broker failed:", error);
    });
  }

  /**
   * Subscribes `conn` to `topic`; subscribing twice is one subscription.
   * When the connection closes it is unsubscribed from everything (a closed
   * connection is not subscribed at all).
   *
   * @param conn The connection that receives the topic's messages.
   * @param topic The topic.
   */
  subscribe(conn: Conn, topic: string): void {
    if (conn.closed) return;
    let subscriber = this.#byConn.get(conn);
    if (subscriber === undefined) {
      subscriber = new Subscriber(conn);
      this.#byConn.set(conn, subscriber);
      if (!this.#watched.has(conn)) {
        this.#watched.add(conn);
        onClosed(conn, () => this.unsubscribeAll(conn));
      }
    }
    if (subscriber.topics.has(topic)) return;
    subscriber.topics.add(topic);
    let subscribers = this.#byTopic.get(topic);
    if (subscribers === undefined) {
      subscribers = new Set();
      this.#byTopic.set(topic, subscribers);
      this.#brokerSubscribe(topic);
    }
    subscribers.add(subscriber);
  }

  /**
   * Unsubscribes `conn` from `topic` (nothing happens if it was not
   * subscribed).
   *
   * @param conn The connection.
   * @param topic The topic.
   */
  unsubscribe(conn: Conn, topic: string): void {
    const subscriber = this.#byConn.get(conn);
    if (subscriber === undefined || !subscriber.topics.delete(topic)) return;
    if (subscriber.topics.size === 0) this.#byConn.delete(conn);
    const subscribers = this.#byTopic.get(topic)!;
    subscribers.delete(subscriber);
    if (subscribers.size === 0) {
      this.#byTopic.delete(topic);
      this.#brokerCall(this.#broker?.unsubscribe(topic));
    }
  }

  /**
   * Unsubscribes `conn` from every topic (which its closing also does).
   *
   * @param conn The connection.
   */
  unsubscribeAll(conn: Conn): void {
    const subscriber = this.#byConn.get(conn);
    if (subscriber === undefined) return;
    for (const topic of [...subscriber.topics]) this.unsubscribe(conn, topic);
  }

  /**
   * The topics `conn` is subscribed to.
   *
   * @param conn The connection.
   * @returns The topics, in subscription order.
   */
  topicsOf(conn: Conn): string[] {
    return [...this.#byConn.get(conn)?.topics ?? []];
  }

  /**
   * How many connections of this process are subscribed to `topic`.
   *
   * @param topic The topic.
   * @returns The number of local subscribers.
   */
  subscriberCount(topic: string): number {
    return this.#byTopic.get(topic)?.size ?? 0;
  }

  /**
   * Publishes a message to every subscriber of `topic`, here and, with a
   * broker, in every other process. Returns at once: each subscriber's copy
   * is queued, and a subscriber whose queue is full is dropped (closed with
   * 1008). A broker failure goes to `onBrokerError`.
   *
   * @param topic The topic.
   * @param data The message: a string (sent as UTF-8) or bytes.
   * @param options Its type, and a connection to leave out.
   * @returns How many local subscribers it was queued for.
   * @throws {TypeError} `data` is neither a string nor bytes, or `type` is
   * not a data message type.
   */
  publish(
    topic: string,
    data: string | Uint8Array,
    options: PublishOptions = {},
  ): number {
    const type = options.type ??
      (typeof data === "string" ? MESSAGE_TYPE.Text : MESSAGE_TYPE.Binary);
    if (type !== MESSAGE_TYPE.Text && type !== MESSAGE_TYPE.Binary) {
      throw new TypeError(
        `Cannot publish: ${type} is not a data message type`,
      );
    }
    const message = new PreparedMessage(type, data);
    const delivered = this.#deliver(topic, message, options.exclude);
    if (this.#broker !== undefined) {
      this.#brokerCall(
        this.#broker.publish(topic, this.#envelope(topic, message)),
      );
    }
    return delivered;
  }

  /** Queues `message` for the local subscribers of `topic`. */
  #deliver(
    topic: string,
    message: PreparedMessage,
    exclude: Conn | undefined,
  ): number {
    const subscribers = this.#byTopic.get(topic);
    if (subscribers === undefined) return 0;
    let delivered = 0;
    for (const subscriber of [...subscribers]) {
      if (subscriber.conn === exclude) continue;
      if (subscriber.enqueue(message, this.#maxQueue)) delivered++;
      else this.#drop(subscriber);
    }
    return delivered;
  }

  /** A subscriber too slow to keep: forget it and close it with 1008. */
  #drop(subscriber: Subscriber): void {
    this.unsubscribeAll(subscriber.conn);
    subscriber.clear();
    subscriber.conn.closeGracefully(
      CLOSE_CODE.PolicyViolation,
      "too slow",
      { timeout: DROP_CLOSE_TIMEOUT },
    );
  }

  /** Origin, type, topic length and topic, then the payload. */
  #envelope(topic: string, message: PreparedMessage): Uint8Array {
    const name = encoder.encode(topic);
    const head = ORIGIN_BYTES + 3;
    const bytes = new Uint8Array(head + name.length + message.data.length);
    bytes.set(this.#origin);
    bytes[ORIGIN_BYTES] = message.type;
    bytes[ORIGIN_BYTES + 1] = name.length >> 8;
    bytes[ORIGIN_BYTES + 2] = name.length & 0xff;
    bytes.set(name, head);
    bytes.set(message.data, head + name.length);
    return bytes;
  }

  /** A message from the broker: delivered here unless it came from here. */
  #received(payload: Uint8Array): void {
    const head = ORIGIN_BYTES + 3;
    if (payload.length < head) return;
    let own = true;
    for (let i = 0; i < ORIGIN_BYTES && own; i++) {
      own = payload[i] === this.#origin[i];
    }
    if (own) return;
    const type = payload[ORIGIN_BYTES];
    const nameLength = (payload[ORIGIN_BYTES + 1] << 8) |
      payload[ORIGIN_BYTES + 2];
    if (
      (type !== MESSAGE_TYPE.Text && type !== MESSAGE_TYPE.Binary) ||
      payload.length < head + nameLength
    ) return; // not a Topics envelope
    const topic = new TextDecoder().decode(
      payload.subarray(head, head + nameLength),
    );
    const data = payload.subarray(head + nameLength);
    this.#deliver(topic, new PreparedMessage(type, data), undefined);
  }

  /**
   * Subscribes the broker to `topic`. A subscription that fails (the broker
   * is down) is retried every second while the topic has local subscribers,
   * or it would never come back with the broker.
   */
  #brokerSubscribe(topic: string): void {
    if (this.#broker === undefined) return;
    this.#brokerCall(
      this.#broker.subscribe(topic, (payload) => this.#received(payload)),
      () => {
        const retry = setTimeout(() => {
          if (this.#byTopic.has(topic)) this.#brokerSubscribe(topic);
        }, SUBSCRIBE_RETRY_MS);
        // A retry alone does not keep the process alive.
        Deno.unrefTimer(retry);
      },
    );
  }

  /** Observes a broker call: failures go to onBrokerError, never unhandled. */
  #brokerCall(
    call: Promise<void> | undefined,
    onFailure?: () => void,
  ): void {
    call?.then(() => {
      this.#brokerFailing = false;
    }, (error) => {
      try {
        this.#onBrokerError(error);
      } catch (hookError) {
        console.error("Topics: onBrokerError threw:", hookError);
      }
      this.#brokerFailing = true;
      onFailure?.();
    });
  }
}
