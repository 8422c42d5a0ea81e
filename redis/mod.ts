/**
 * A Redis {@linkcode Broker} for {@linkcode Topics}: publishes go through
 * Redis pub/sub, so the subscribers of every process connected to the same
 * Redis get them. It uses the `redis` package from npm, so it lives in its
 * own module: `@denows/websocket` itself imports nothing.
 *
 * Two connections are opened, as Redis requires for pub/sub: one publishes,
 * one subscribes. Both reconnect by themselves after an outage, and the
 * subscribing one restores its subscriptions. While Redis is unreachable a
 * publish fails at once (it is not queued without bound), which `Topics`
 * reports to its `onBrokerError`; local delivery goes on.
 *
 * @example Two processes, one room
 * ```ts ignore
 * import { Topics } from "@denows/websocket";
 * import { RedisBroker } from "@denows/websocket/redis";
 *
 * const broker = await RedisBroker.connect("redis://127.0.0.1:6379");
 * const topics = new Topics({ broker });
 * // topics.subscribe(conn, "room") and topics.publish("room", text) as
 * // usual: every process that does the same shares the room.
 * ```
 *
 * @module
 */
// deno-lint-ignore-file no-import-prefix -- the one npm import, kept out of the import map so the core and the examples never load it
import { Buffer } from "node:buffer";
import { createClient } from "npm:redis@4";
import type { Broker } from "../topics.ts";

export type { Broker } from "../topics.ts";

/** Options for {@linkcode RedisBroker.connect}. */
export interface RedisBrokerOptions {
  /** Prefix of the Redis channels, one per topic (default `"ws:"`). */
  channelPrefix?: string;
  /**
   * Called with connection errors (the clients keep reconnecting). Default:
   * log to stderr, once until the connection is back.
   */
  onError?: (error: unknown) => void;
}

type RedisClient = ReturnType<typeof createClient>;

/** A {@linkcode Broker} over Redis pub/sub (see the module docs). */
export class RedisBroker implements Broker {
  readonly #publisher: RedisClient;
  readonly #subscriber: RedisClient;
  readonly #prefix: string;

  private constructor(
    publisher: RedisClient,
    subscriber: RedisClient,
    prefix: string,
  ) {
    this.#publisher = publisher;
    this.#subscriber = subscriber;
    this.#prefix = prefix;
  }

  /**
   * Connects to Redis.
   *
   * @param url A `redis://` (or `rediss://`) URL.
   * @param options Channel prefix and error hook.
   * @returns The broker, once both connections are up.
   * @throws {Error} Redis cannot be reached (the error says where).
   */
  static async connect(
    url: string,
    options: RedisBrokerOptions = {},
  ): Promise<RedisBroker> {
    let failing = false;
    let connected = false;
    const onError = options.onError ?? ((error: unknown) => {
      if (!failing) console.error(`RedisBroker: ${url}:`, error);
    });
    const client = (): RedisClient => {
      const redis = createClient({
        url,
        // Fail publishes at once while disconnected instead of queueing them
        // without bound; they are reported, local delivery goes on.
        disableOfflineQueue: true,
        socket: {
          // Back off up to a second between attempts, for as long as it
          // takes, once connected; the first connection is not retried.
          reconnectStrategy: (retries: number, cause: Error) =>
            connected ? Math.min(50 * 2 ** retries, 1000) : cause,
        },
      });
      // Without a listener an 'error' event would end the process.
      redis.on("error", (error: unknown) => {
        onError(error);
        failing = true;
      });
      redis.on("ready", () => failing = false);
      return redis;
    };
    const publisher = client();
    const subscriber = client();
    try {
      await Promise.all([publisher.connect(), subscriber.connect()]);
      connected = true;
    } catch (cause) {
      await Promise.allSettled([
        publisher.disconnect(),
        subscriber.disconnect(),
      ]);
      throw new Error(`Cannot connect to Redis at ${url}`, { cause });
    }
    return new RedisBroker(
      publisher,
      subscriber,
      options.channelPrefix ?? "ws:",
    );
  }

  async publish(topic: string, payload: Uint8Array): Promise<void> {
    await this.#publisher.publish(this.#channel(topic), Buffer.from(payload));
  }

  async subscribe(
    topic: string,
    onMessage: (payload: Uint8Array) => void,
  ): Promise<void> {
    await this.#subscriber.subscribe(
      this.#channel(topic),
      (message: Buffer) =>
        onMessage(
          new Uint8Array(message.buffer, message.byteOffset, message.length),
        ),
      true, // deliver messages as Buffers: payloads are bytes
    );
  }

  async unsubscribe(topic: string): Promise<void> {
    await this.#subscriber.unsubscribe(this.#channel(topic));
  }

  /** Closes both connections. */
  async close(): Promise<void> {
    await Promise.allSettled([this.#publisher.quit(), this.#subscriber.quit()]);
  }

  #channel(topic: string): string {
    return this.#prefix + topic;
  }
}
