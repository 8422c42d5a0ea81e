/**
 * A Redis {@linkcode Broker} for {@linkcode Topics}: publishes go through
 * Redis pub/sub, so the subscribers of every process connected to the same
 * Redis get them. It imports no Redis client: you pass two clients of the
 * `redis` package from npm (node-redis 4, or anything with the same
 * methods), one to publish and one to subscribe, as Redis requires for
 * pub/sub. So the library keeps no runtime dependency, and the clients'
 * settings (TLS, auth, reconnection) stay yours.
 *
 * Create them with `disableOfflineQueue: true`: while Redis is unreachable a
 * publish then fails at once rather than queueing without bound, which
 * `Topics` reports to its `onBrokerError` while local delivery goes on. A
 * node-redis subscriber restores its subscriptions when it reconnects.
 *
 * @example Two processes, one room
 * ```ts ignore
 * import { Topics } from "@denows/websocket";
 * import { RedisBroker, type RedisClient } from "@denows/websocket/redis";
 *
 * // Two connected clients of the `redis` package, each made with
 * // createClient({ url, disableOfflineQueue: true }) and given an "error"
 * // listener (an unheard "error" ends the process).
 * declare const publisher: RedisClient, subscriber: RedisClient;
 * const topics = new Topics({ broker: new RedisBroker({ publisher, subscriber }) });
 * // topics.subscribe(conn, "room") and topics.publish("room", text) as
 * // usual: every process that does the same shares the room.
 * ```
 *
 * @module
 */
import { Buffer } from "node:buffer";
import type { Broker } from "../topics.ts";

export type { Broker } from "../topics.ts";

/**
 * The methods of a node-redis 4 client that the broker calls. Messages are
 * bytes: they are published as Buffers and subscribed to in buffer mode.
 */
export interface RedisClient {
  /** PUBLISH. */
  publish(channel: string, message: Buffer): Promise<unknown>;
  /** SUBSCRIBE, with `bufferMode` true: the listener gets Buffers. */
  subscribe(
    channel: string,
    listener: (message: Buffer) => void,
    bufferMode: true,
  ): Promise<unknown>;
  /** UNSUBSCRIBE. */
  unsubscribe(channel: string): Promise<unknown>;
  /** QUIT. */
  quit(): Promise<unknown>;
}

/** Options for {@linkcode RedisBroker}. */
export interface RedisBrokerOptions {
  /** The connected client that publishes. */
  publisher: RedisClient;
  /** A second connected client, given over to subscribing. */
  subscriber: RedisClient;
  /** Prefix of the Redis channels, one per topic (default `"ws:"`). */
  channelPrefix?: string;
}

/** A {@linkcode Broker} over Redis pub/sub (see the module docs). */
export class RedisBroker implements Broker {
  readonly #publisher: RedisClient;
  readonly #subscriber: RedisClient;
  readonly #prefix: string;

  /**
   * Makes a broker over two connected clients.
   *
   * @param options The publishing and the subscribing client, and the
   * channel prefix.
   * @throws {TypeError} The two clients are the same one: a subscribed
   * Redis connection can no longer publish.
   */
  constructor(options: RedisBrokerOptions) {
    if (options.publisher === options.subscriber) {
      throw new TypeError(
        "Cannot create RedisBroker: the publisher and the subscriber must be two clients",
      );
    }
    this.#publisher = options.publisher;
    this.#subscriber = options.subscriber;
    this.#prefix = options.channelPrefix ?? "ws:";
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

  /** Closes both clients. */
  async close(): Promise<void> {
    await Promise.allSettled([this.#publisher.quit(), this.#subscriber.quit()]);
  }

  #channel(topic: string): string {
    return this.#prefix + topic;
  }
}
