// An in-memory, connected pair of byte transports for tests: what one end
// writes the other end reads. It can cut the stream at chosen points (one
// byte per read, given offsets, seeded random points) so that every parser
// state is reached, make writes partial, apply backpressure, and simulate a
// clean EOF or a connection reset.

import type { Transport } from "./conn.ts";

/**
 * How an end's reads cut the incoming stream.
 *
 * - `"whole"`: a read returns everything buffered (up to the read buffer).
 * - `"byte"`: a read returns one byte.
 * - `{ splitAt }`: reads stop at these offsets of the stream (bytes read so
 *   far by this end); between them a read returns all it can.
 * - `{ seed }`: reads return a seeded pseudo-random count of 1..`maxChunk`
 *   bytes (default 64), reproducible for a given seed.
 */
export type Delivery =
  | "whole"
  | "byte"
  | { splitAt: readonly number[] }
  | { seed: number; maxChunk?: number };

/** Options of {@linkcode createPipe}. */
export interface PipeOptions {
  /** How both ends' reads cut the stream (default `"whole"`). */
  delivery?: Delivery;
  /**
   * Bytes that may sit unread in one direction before a write waits for
   * the reader (backpressure; default unbounded).
   */
  capacity?: number;
  /** At most this many bytes are accepted per `write()` call (default all). */
  maxWrite?: number;
}

/** Small deterministic PRNG (mulberry32) so random splits are reproducible. */
export function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Waiter = () => void;

/** One direction of the pipe: bytes written by one end, read by the other. */
class Channel {
  chunks: Uint8Array[] = [];
  buffered = 0;
  /** Set when the writer ended the stream: reads return null once drained. */
  eof = false;
  /** Set when the writer reset the connection: reads reject. */
  resetError: Error | undefined;
  readWaiter: Waiter | undefined;
  writeWaiters: Waiter[] = [];

  wakeReader(): void {
    const waiter = this.readWaiter;
    this.readWaiter = undefined;
    waiter?.();
  }

  wakeWriters(): void {
    const waiters = this.writeWaiters;
    this.writeWaiters = [];
    for (const waiter of waiters) waiter();
  }
}

let nextPort = 1;

/**
 * One end of an in-memory pipe. It satisfies {@linkcode Transport} and adds
 * `end()` and `reset()` to simulate how real connections die.
 */
export class PipeEnd implements Transport {
  readonly localAddr: Deno.NetAddr;
  readonly remoteAddr: Deno.NetAddr;
  /** How this end's reads cut the stream; may be changed at any time. */
  delivery: Delivery;
  #in: Channel;
  #out: Channel;
  #capacity: number;
  #maxWrite: number;
  #closed = false;
  #readOffset = 0;
  #random: (() => number) | undefined;
  #randomSeed: number | undefined;

  constructor(
    incoming: Channel,
    outgoing: Channel,
    options: PipeOptions,
    ports: [number, number],
  ) {
    this.#in = incoming;
    this.#out = outgoing;
    this.delivery = options.delivery ?? "whole";
    this.#capacity = options.capacity ?? Infinity;
    this.#maxWrite = options.maxWrite ?? Infinity;
    this.localAddr = { transport: "tcp", hostname: "pipe", port: ports[0] };
    this.remoteAddr = { transport: "tcp", hostname: "pipe", port: ports[1] };
  }

  /** Whether `close()` or `reset()` was called on this end. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes written by the peer that this end has not read yet. */
  get buffered(): number {
    return this.#in.buffered;
  }

  /** Total bytes this end has read so far. */
  get bytesRead(): number {
    return this.#readOffset;
  }

  async read(buffer: Uint8Array): Promise<number | null> {
    const channel = this.#in;
    while (true) {
      if (this.#closed) {
        throw new Deno.errors.BadResource(
          "Cannot read: the pipe end is closed",
        );
      }
      if (channel.resetError) throw channel.resetError;
      if (channel.buffered > 0) break;
      if (channel.eof) return null;
      if (channel.readWaiter) {
        throw new Deno.errors.Busy("Cannot read: a read is already pending");
      }
      await new Promise<void>((resolve) => channel.readWaiter = resolve);
    }
    if (buffer.length === 0) return 0;
    const want = Math.min(buffer.length, channel.buffered, this.#limit());
    let copied = 0;
    while (copied < want) {
      const chunk = channel.chunks[0];
      const take = Math.min(chunk.length, want - copied);
      buffer.set(chunk.subarray(0, take), copied);
      copied += take;
      if (take === chunk.length) channel.chunks.shift();
      else channel.chunks[0] = chunk.subarray(take);
    }
    channel.buffered -= copied;
    this.#readOffset += copied;
    if (channel.buffered <= this.#capacity) channel.wakeWriters();
    return copied;
  }

  /** Largest count the next read may return under the delivery mode. */
  #limit(): number {
    const delivery = this.delivery;
    if (delivery === "whole") return Infinity;
    if (delivery === "byte") return 1;
    if ("splitAt" in delivery) {
      for (const point of delivery.splitAt) {
        if (point > this.#readOffset) return point - this.#readOffset;
      }
      return Infinity;
    }
    if (this.#randomSeed !== delivery.seed) {
      this.#randomSeed = delivery.seed;
      this.#random = prng(delivery.seed);
    }
    return 1 + Math.floor(this.#random!() * (delivery.maxChunk ?? 64));
  }

  async write(data: Uint8Array): Promise<number> {
    const channel = this.#out;
    while (true) {
      if (this.#closed) {
        throw new Deno.errors.BadResource(
          "Cannot write: the pipe end is closed",
        );
      }
      if (channel.eof || channel.resetError) {
        throw new Deno.errors.BrokenPipe("Cannot write: the peer is closed");
      }
      if (channel.buffered < this.#capacity || data.length === 0) break;
      await new Promise<void>((resolve) => channel.writeWaiters.push(resolve));
    }
    // Like a socket, a write takes what fits under the capacity.
    const count = Math.min(
      data.length,
      this.#maxWrite,
      Math.max(this.#capacity - channel.buffered, 0),
    );
    if (count === 0) return 0;
    channel.chunks.push(data.slice(0, count));
    channel.buffered += count;
    channel.wakeReader();
    return count;
  }

  /**
   * Closes this end: the peer reads the remaining bytes, then EOF; this
   * end's pending read rejects. Throws when already closed, as `Deno.Conn`.
   */
  close(): void {
    if (this.#closed) {
      throw new Deno.errors.BadResource("Cannot close: the pipe end is closed");
    }
    this.#closed = true;
    this.#out.eof = true;
    this.#out.wakeReader();
    this.#out.wakeWriters();
    this.#in.eof = true;
    this.#in.wakeReader();
    this.#in.wakeWriters();
  }

  /**
   * Simulates a reset: the peer's reads reject with `ConnectionReset`
   * (even with unread bytes pending) and this end is closed.
   */
  reset(): void {
    this.#out.resetError = new Deno.errors.ConnectionReset(
      "Connection reset by peer",
    );
    this.#out.chunks = [];
    this.#out.buffered = 0;
    if (!this.#closed) this.close();
  }

  /** Half-close: the peer reads what was written, then EOF. */
  end(): void {
    this.#out.eof = true;
    this.#out.wakeReader();
  }
}

/**
 * Creates an in-memory connected pair: bytes written to one end are read
 * from the other.
 */
export function createPipe(options: PipeOptions = {}): [PipeEnd, PipeEnd] {
  const aToB = new Channel();
  const bToA = new Channel();
  const portA = nextPort++;
  const portB = nextPort++;
  return [
    new PipeEnd(bToA, aToB, options, [portA, portB]),
    new PipeEnd(aToB, bToA, options, [portB, portA]),
  ];
}
