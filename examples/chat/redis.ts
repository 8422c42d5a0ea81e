/**
 * Connects a {@linkcode RedisBroker} over two node-redis clients from npm:
 * the chat example's way of sharing rooms across processes, loaded only when
 * `--redis` is given (the library itself imports no Redis client).
 *
 * @module
 */
// deno-lint-ignore-file no-import-prefix -- the one npm import of the chat example, kept out of the import map so a plain chat server starts without npm
import { createClient } from "npm:redis@4";
import { RedisBroker } from "../../redis/mod.ts";

/** Options for {@linkcode connectRedisBroker}. */
export interface ConnectOptions {
  /** Prefix of the Redis channels (default `"ws:"`). */
  channelPrefix?: string;
  /**
   * Called with connection errors (the clients keep reconnecting). Default:
   * log to stderr, once until the connection is back.
   */
  onError?: (error: unknown) => void;
}

/**
 * Opens the publishing and the subscribing connection to `url` and makes
 * the broker once both are up.
 *
 * @throws {Error} Redis cannot be reached (the error says where).
 */
export async function connectRedisBroker(
  url: string,
  options: ConnectOptions = {},
): Promise<RedisBroker> {
  let failing = false;
  let connected = false;
  const onError = options.onError ?? ((error: unknown) => {
    if (!failing) console.error(`RedisBroker: ${url}:`, error);
  });
  const client = () => {
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
    await Promise.allSettled([publisher.disconnect(), subscriber.disconnect()]);
    throw new Error(`Cannot connect to Redis at ${url}`, { cause });
  }
  return new RedisBroker({
    publisher,
    subscriber,
    channelPrefix: options.channelPrefix,
  });
}
