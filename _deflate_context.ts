// What a connection keeps between permessage-deflate messages, and how it
// lets go of it while idle:
// - the inflater of received messages, reused while messages flow;
// - with context takeover (RFC 7692 section 7.1.1), the LZ77 windows that
//   messages refer back into, in both directions: the zlib streams are freed
//   while the connection idles and rebuilt from the kept 32 KiB of history.
// One shared, unref'd interval timer runs while any connection holds such
// state and frees what went unused for over a second.

import zlib from "node:zlib";
import {
  asInflateError,
  type DeflateSettings,
  endsWith,
  type Flusher,
  InflateError,
  type InflateOptions,
  MAX_EXPANSION,
  MAX_SLICE,
  MessageInflater,
  MIN_INFLATE_SLICE,
  SYNC_TAIL,
  ZlibFlusher,
} from "./_deflate_stream.ts";
import { concat } from "./_io.ts";

/** Milliseconds between sweeps that free the state of idle connections. */
const SWEEP_INTERVAL = 1000;

/** State a connection keeps that the sweep frees once it goes unused. */
interface Sweepable {
  /** The sweep tick of the last use. */
  used: number;
  /** Part-way through a message: it must not be freed now. */
  busy: boolean;
  /** Frees what can be rebuilt; `keep()` again before the next use. */
  release(): void;
}

const kept = new Set<Sweepable>();
let sweepTick = 0;
let sweepTimer: ReturnType<typeof setInterval> | undefined;

/** Marks `state` used now, and watched by the sweep. */
function keep(state: Sweepable): void {
  state.used = sweepTick;
  if (kept.has(state)) return;
  kept.add(state);
  if (sweepTimer === undefined) {
    sweepTimer = setInterval(sweep, SWEEP_INTERVAL);
    Deno.unrefTimer(sweepTimer);
  }
}

/** Stops watching `state` (it was released). */
function letGo(state: Sweepable): void {
  kept.delete(state);
  if (kept.size === 0 && sweepTimer !== undefined) {
    clearInterval(sweepTimer);
    sweepTimer = undefined;
  }
}

/**
 * Releases whatever has not been used since the previous sweep (idle for one
 * to two intervals).
 */
function sweep(): void {
  sweepTick++;
  for (const state of kept) {
    if (!state.busy && sweepTick - state.used >= 2) state.release();
  }
}

/** The LZ77 window a DEFLATE stream may refer back into: 32 KiB. */
const WINDOW = 32 * 1024;

/** The last 32 KiB that went through a DEFLATE stream, kept as a ring. */
class History {
  readonly #ring = new Uint8Array(WINDOW);
  #end = 0;
  #full = false;

  remember(bytes: Uint8Array): void {
    const tail = bytes.length > WINDOW
      ? bytes.subarray(bytes.length - WINDOW)
      : bytes;
    const first = Math.min(tail.length, WINDOW - this.#end);
    this.#ring.set(tail.subarray(0, first), this.#end);
    this.#ring.set(tail.subarray(first), 0);
    const end = this.#end + tail.length;
    if (end >= WINDOW) this.#full = true;
    this.#end = end % WINDOW;
  }

  /** The kept bytes, oldest first. */
  contents(): Uint8Array {
    return this.#full
      ? concat([
        this.#ring.subarray(this.#end),
        this.#ring.subarray(0, this.#end),
      ])
      : this.#ring.subarray(0, this.#end);
  }

  clear(): void {
    this.#end = 0;
    this.#full = false;
  }
}

/** What an {@linkcode InflaterSlot} inflates with. */
interface Inflater {
  inflate(data: Uint8Array, options: InflateOptions): Promise<Uint8Array[]>;
  close(): void;
}

/**
 * Inflates a peer that uses context takeover (RFC 7692 section 7.1.1): its
 * messages may refer back into the ones before, so one node:zlib stream
 * carries all of them, and only the section 7.2.2 tail is appended (no
 * sentinel: it would shift the window the peer compresses against). The
 * last 32 KiB of output are kept, so that `suspend()` can free the zlib
 * state of an idle connection: a new stream is primed with them, as one
 * stored block whose output is dropped (Deno's node:zlib ignores a raw
 * stream's `dictionary`). Input goes in slices small enough that the output
 * cannot pass the read limit by more than one slice's worth.
 */
class ContextInflater implements Inflater {
  #zlib: zlib.InflateRaw | undefined;
  #chunks: Uint8Array[] = [];
  #failed: ((error: unknown) => void) | undefined;
  #produced = 0; // inflated bytes of the current message
  /** The last 32 KiB of output: what the peer's next message may refer to. */
  readonly #history = new History();

  async inflate(
    data: Uint8Array,
    options: InflateOptions,
  ): Promise<Uint8Array[]> {
    const out: Uint8Array[] = [];
    try {
      for (let offset = 0; offset < data.length;) {
        const size = Math.max(
          MIN_INFLATE_SLICE,
          Math.min(
            MAX_SLICE,
            Math.floor((options.limit - this.#produced) / MAX_EXPANSION),
          ),
        );
        this.#take(
          await this.#push(data.subarray(offset, offset + size)),
          options.limit,
          out,
        );
        offset += size;
      }
      if (options.final) {
        this.#take(await this.#push(SYNC_TAIL), options.limit, out);
        this.#produced = 0;
      }
      return out;
    } catch (error) {
      this.close();
      throw asInflateError(error);
    }
  }

  /** Frees the zlib state; the window is kept for the next message. */
  suspend(): void {
    this.#zlib?.close();
    this.#zlib = undefined;
  }

  /** Frees everything: the connection is done with the inflater. */
  close(): void {
    this.suspend();
    this.#history.clear();
    this.#produced = 0;
  }

  /** A new stream, primed with the window of the messages before. */
  async #open(): Promise<zlib.InflateRaw> {
    const stream = zlib.createInflateRaw();
    stream.on("data", (chunk: Uint8Array) => this.#chunks.push(chunk));
    stream.on("error", (error: unknown) => this.#failed?.(error));
    const window = this.#history.contents();
    if (window.length > 0) {
      // A non-final stored block (RFC 1951 section 3.2.4): its bytes land
      // in the LZ77 window as if they had just been inflated.
      const n = window.length;
      const block = new Uint8Array(5 + n);
      block.set([0x00, n & 0xff, n >> 8, ~n & 0xff, (~n >> 8) & 0xff]);
      block.set(window, 5);
      await this.#write(stream, block);
    }
    return stream;
  }

  /** Writes `bytes` with a sync flush; resolves what they inflated to. */
  async #push(bytes: Uint8Array): Promise<Uint8Array[]> {
    this.#zlib ??= await this.#open();
    return await this.#write(this.#zlib, bytes);
  }

  #write(stream: zlib.InflateRaw, bytes: Uint8Array): Promise<Uint8Array[]> {
    return new Promise((resolve, reject) => {
      this.#failed = reject;
      stream.write(bytes);
      stream.flush(zlib.constants.Z_SYNC_FLUSH, () => {
        this.#failed = undefined;
        // Corrupt data destroys the stream at once; its "error" event may
        // come only after this callback.
        if (stream.destroyed) {
          reject(new Error("Cannot inflate: corrupt DEFLATE data"));
        } else {
          resolve(this.#chunks.splice(0));
        }
      });
    });
  }

  /** Counts `chunks` against the limit and into the window; appends them. */
  #take(chunks: Uint8Array[], limit: number, out: Uint8Array[]): void {
    for (const chunk of chunks) {
      this.#produced += chunk.length;
      if (this.#produced > limit) {
        throw new InflateError(
          1009,
          `Cannot inflate message: it exceeds the read limit of ${limit} bytes`,
        );
      }
      this.#history.remember(chunk);
      out.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
    }
  }
}

/**
 * A connection's inflater, kept while messages flow and freed once the
 * connection idles. Keeping a {@linkcode MessageInflater} saves ~13 us per
 * message (a fresh DecompressionStream; measured 10 us reused vs 23-25 us
 * fresh for a 2 KiB JSON message), while an idle connection should not hold
 * the ~58 KiB of inflate state. With context takeover only the zlib state is
 * freed; the window stays. A connection frees its own when it closes.
 */
export class InflaterSlot implements Sweepable {
  readonly #takeover: boolean;
  #inflater: Inflater | undefined;
  used = 0;
  busy = false;

  /**
   * @param takeover The peer may use context takeover: one inflater keeps
   * its window for the connection's life (suspended while idle).
   */
  constructor(takeover: boolean) {
    this.#takeover = takeover;
  }

  /** Inflates a piece of the current message (see MessageInflater). */
  async inflate(
    piece: Uint8Array,
    final: boolean,
    limit: number,
  ): Promise<Uint8Array[]> {
    this.#inflater ??= this.#takeover
      ? new ContextInflater()
      : new MessageInflater();
    keep(this);
    this.busy = true;
    try {
      const chunks = await this.#inflater.inflate(piece, { final, limit });
      this.busy = !final;
      return chunks;
    } catch (error) {
      // The inflater closed itself; the next message starts a new one.
      this.busy = false;
      throw error;
    }
  }

  /**
   * Frees the inflater (a later message creates a new one), or with context
   * takeover only its zlib state, keeping the window it resumes from.
   */
  release(): void {
    if (this.#inflater === undefined) return;
    if (this.#inflater instanceof ContextInflater) {
      this.#inflater.suspend();
    } else {
      this.#inflater.close();
      this.#inflater = undefined;
    }
    this.busy = false;
    letGo(this);
  }
}

/**
 * Compresses this end's messages with context takeover (RFC 7692 section
 * 7.1.1): one node:zlib stream carries every compressed message, so a
 * message may refer back into the ones before, as the peer's inflater keeps
 * them. The last 32 KiB of input are kept, so that an idle connection's zlib
 * state (about 250 KiB at 15 window bits) can be freed: a new stream is
 * primed by compressing them again and dropping that output, which leaves
 * its window as the peer's inflater has it. A level change rebuilds the
 * stream the same way. A stream that ever fails is not used again: messages
 * go out uncompressed from then on, which section 6 allows.
 */
export class ContextDeflater implements Flusher, Sweepable {
  readonly maxSlice = Infinity;
  #stream: ZlibFlusher | undefined;
  /** What `#stream` was made with; the next push uses `#settings`. */
  #streamLevel: number | undefined;
  #settings: DeflateSettings;
  readonly #history = new History();
  #broken = false;
  #closed = false;
  used = 0;
  busy = false;

  /** @param settings The window and level to compress with. */
  constructor(settings: DeflateSettings) {
    this.#settings = settings;
  }

  /** The settings of the next messages (the level may have changed). */
  use(settings: DeflateSettings): this {
    this.#settings = settings;
    return this;
  }

  async push(bytes: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.#broken || this.#closed) return undefined;
    keep(this);
    this.busy = true;
    try {
      const stream = await this.#open();
      const out = stream && await stream.push(bytes);
      if (out === undefined || !endsWith(out, SYNC_TAIL)) {
        this.#broken = true;
        return undefined;
      }
      this.#history.remember(bytes);
      return out;
    } finally {
      this.busy = false;
      if (this.#closed || this.#broken) this.close();
    }
  }

  /** A message ended; the stream carries on into the next one. */
  end(): void {}

  /** Frees the zlib state; the history stays for the next message. */
  release(): void {
    if (this.busy) return;
    this.#stream?.end();
    this.#stream = undefined;
    letGo(this);
  }

  /** The connection is done: frees everything, now or once a push ends. */
  close(): void {
    this.#closed = true;
    if (this.busy) return;
    this.release();
    this.#history.clear();
  }

  /** The stream for `#settings`, primed with the history when it is new. */
  async #open(): Promise<ZlibFlusher | undefined> {
    const level = this.#settings.level;
    if (this.#stream !== undefined && this.#streamLevel === level) {
      return this.#stream;
    }
    this.#stream?.end();
    const stream = this.#stream = new ZlibFlusher(this.#settings);
    this.#streamLevel = level;
    const window = this.#history.contents();
    if (window.length > 0 && await stream.push(window) === undefined) {
      return undefined;
    }
    return stream;
  }
}
