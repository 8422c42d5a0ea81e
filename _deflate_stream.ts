// The permessage-deflate engine (RFC 7692 section 7.2): compresses one message
// with a fresh CompressionStream and inflates received messages through a
// DecompressionStream, bounding the inflated size. Negotiation lives in
// deflate.ts; what a connection keeps between messages (its inflater, and
// the windows of context takeover) lives in _deflate_context.ts. It also
// compresses the fragments of a streamed message.
//
// CompressionStream has no level and no window size. When the application
// chooses a level, or the peer allows only a smaller window, messages are
// compressed with node:zlib (part of Deno) instead, which takes both: small
// messages synchronously (~12 us for 2 KiB at level 1), larger ones on
// zlib's asynchronous path so that the event loop is not held up.
//
// Deno behaviours this relies on (pinned in tests/deflate_test.ts):
// - CompressionStream("deflate-raw") sync-flushes after every write(), so the
//   one chunk a write yields ends in 00 00 ff ff.
// - A write whose compressed output exceeds ~32 KiB can lose that marker, so
//   input goes in slices of at most 16 KiB.
// - Both streams enqueue at most one chunk per write(), synchronously inside
//   the transform, so an armed read() holds it once the write resolves.
// - DecompressionStream rejects a write with "failed to write whole buffer"
//   when bytes follow a final (BFINAL) block, dropping that write's output,
//   and with "corrupt deflate stream" on invalid data.

import zlib from "node:zlib";
import type { DeflateParameters } from "./deflate.ts";
import { CLOSE_CODE, ProtocolError } from "./frame.ts";
import { concat } from "./_io.ts";

/**
 * Messages shorter than this many bytes are sent uncompressed by default.
 *
 * A fresh CompressionStream costs ~13-20 us per message whatever its size
 * (bench/deflate_bench.ts), while a small frame costs ~2 us to write; below a
 * few hundred bytes the bytes saved do not pay for that.
 */
export const DEFAULT_COMPRESSION_THRESHOLD = 256;

/** The 4 octets RFC 7692 section 7.2.1 strips and section 7.2.2 appends. */
export const SYNC_TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);

/**
 * What the inflater appends to each message: the section 7.2.2 tail, then a
 * non-final fixed-Huffman block holding the 4 bytes {@linkcode SENTINEL_TEXT}
 * and an empty stored block that realigns to a byte boundary (that is,
 * deflate-raw of those bytes with a sync flush). A well-formed message leaves
 * the inflater between blocks, so the output ends in exactly those 4 bytes
 * and the inflater is ready for the next message. A truncated message
 * consumes the bytes as something else (a stored block copies them verbatim,
 * which ends in different bytes), so the check catches it. The decoded bytes
 * also guarantee every message's last write yields a chunk.
 */
// deno-fmt-ignore
const SENTINEL = new Uint8Array([
  0x00, 0x00, 0xff, 0xff, // the RFC 7692 section 7.2.2 tail
  0x0a, 0x0f, 0x7e, 0xc9, 0x0b, // fixed-Huffman block of 57 53 e9 0d,
  0x00, 0x00, 0x00, 0xff, 0xff, // then an empty stored block (sync flush)
]);
/** The bytes {@linkcode SENTINEL} inflates to after a well-formed message. */
const SENTINEL_TEXT = new Uint8Array([0x57, 0x53, 0xe9, 0x0d]);

/** Largest input slice per write(): keeps CompressionStream's marker intact. */
export const MAX_SLICE = 16 * 1024;
/** DEFLATE expands at most ~1032:1 (a 258-byte match in 2 bits). */
export const MAX_EXPANSION = 1032;
/** Smallest inflate slice, so a nearly spent limit still makes progress. */
export const MIN_INFLATE_SLICE = 64;

/** gorilla's compression levels: -2 (Huffman only) to 9 (best compression). */
export const MIN_COMPRESSION_LEVEL = -2;
/** The best compression, slowest. */
export const MAX_COMPRESSION_LEVEL = 9;

/**
 * How one end compresses the messages it sends (RFC 7692 section 7.1.2.1 and
 * 7.1.2.2): the window the peer allows it, whether it keeps that window
 * between messages (section 7.1.1) and, when the application chose one, the
 * level.
 */
export interface DeflateSettings {
  /** gorilla's level, -2 to 9; undefined: CompressionStream's own. */
  readonly level: number | undefined;
  /** Base-2 logarithm of the largest window the peer allows, 9 to 15. */
  readonly windowBits: number;
  /** Messages may refer back into the ones before (context takeover). */
  readonly contextTakeover: boolean;
}

/**
 * What an endpoint in `role` compresses with, or undefined when it must send
 * uncompressed, which RFC 7692 section 6 allows: a peer that allows only an
 * 8-bit window, which zlib cannot honour (it widens raw windows of 8 bits to
 * 9).
 */
export function deflateSettings(
  parameters: DeflateParameters,
  role: "server" | "client",
  level: number | undefined,
): DeflateSettings | undefined {
  const server = role === "server";
  const windowBits = server
    ? parameters.serverMaxWindowBits
    : parameters.clientMaxWindowBits;
  const contextTakeover = server
    ? !parameters.serverNoContextTakeover
    : !parameters.clientNoContextTakeover;
  return windowBits < 9 ? undefined : { level, windowBits, contextTakeover };
}

/** The default: CompressionStream, whose window is the largest, 15 bits. */
export const STREAM_DEFLATE: DeflateSettings = {
  level: undefined,
  windowBits: 15,
  contextTakeover: false,
};

/** Whether `settings` need node:zlib: a level or a window below 15 bits. */
function needsZlib(settings: DeflateSettings): boolean {
  return settings.level !== undefined || settings.windowBits < 15;
}

/** Messages up to this size are compressed synchronously by node:zlib. */
const SYNC_COMPRESS_LIMIT = 64 * 1024;

/** node:zlib's options for `settings`, in gorilla's meaning of the level. */
function zlibOptions(settings: DeflateSettings): zlib.ZlibOptions {
  const level = settings.level ?? zlib.constants.Z_DEFAULT_COMPRESSION;
  return {
    // Go's flate.HuffmanOnly (-2) is zlib's Huffman-only strategy.
    level: level === -2 ? 1 : level,
    strategy: level === -2
      ? zlib.constants.Z_HUFFMAN_ONLY
      : zlib.constants.Z_DEFAULT_STRATEGY,
    windowBits: settings.windowBits,
    // A compressor's state follows its window: 2^(windowBits + 2) bytes
    // at most, so small windows also make small, cheap-to-clear states.
    memLevel: Math.min(8, Math.max(1, settings.windowBits - 7)),
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
  };
}

/** Which close code an {@linkcode InflateError} asks Conn to send. */
export type InflateErrorCode = 1007 | 1009;

/**
 * A received compressed message could not be inflated: `code` is 1007 when
 * the data is not a valid DEFLATE stream (RFC 6455 section 7.4.1, "data
 * inconsistent with the type of the message") and 1009 when the inflated size
 * passed the read limit.
 */
export class InflateError extends Error {
  /** The close code Conn should send. */
  readonly code: InflateErrorCode;

  constructor(code: InflateErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "InflateError";
    this.code = code;
  }
}

/** What an inflater throws for `error`: itself, or a 1007 for corrupt data. */
export function asInflateError(error: unknown): InflateError {
  if (error instanceof InflateError) return error;
  return new InflateError(
    1007,
    "Cannot inflate message: the data is not a valid DEFLATE stream",
    { cause: error },
  );
}

/**
 * Drives one web TransformStream write by write: before each write a read is
 * armed, so the transform runs without backpressure and the (at most one)
 * chunk it enqueues lands in `#chunk` before the write resolves. No
 * pipeThrough, no per-chunk promise chain: one write, one read.
 */
class StreamDriver {
  /** Input per push: keeps CompressionStream's marker intact. */
  readonly maxSlice = MAX_SLICE;
  #writer: WritableStreamDefaultWriter<BufferSource>;
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #armed = false;
  #chunk: Uint8Array | undefined = undefined;

  constructor(stream: CompressionStream | DecompressionStream) {
    this.#writer = stream.writable.getWriter();
    this.#reader = stream.readable.getReader();
  }

  /**
   * Writes `bytes`; resolves with the chunk the stream produced for them
   * (undefined when none) and rejects with the stream's error.
   */
  async push(bytes: Uint8Array): Promise<Uint8Array | undefined> {
    if (!this.#armed) {
      this.#armed = true;
      // The rejection (a stream error) also rejects the write awaited below,
      // which is where it is reported; here it only has to be observed.
      this.#reader.read().then(this.#onRead, this.#onReadError);
    }
    // A SharedArrayBuffer view is refused by the stream (a rejected write).
    await this.#writer.write(bytes as Uint8Array<ArrayBuffer>);
    const chunk = this.#chunk;
    this.#chunk = undefined;
    return chunk;
  }

  #onRead = (result: ReadableStreamReadResult<Uint8Array>): void => {
    this.#armed = false;
    this.#chunk = result.value;
  };

  #onReadError = (): void => {
    this.#armed = false;
  };

  /** Frees the stream (and its native resource) at once, without waiting. */
  cancel(): void {
    this.#reader.cancel().catch(ignore);
  }

  /**
   * Ends the stream normally and drops what its flush yields. About 5-10 us
   * cheaper than `cancel()`, which errors the writable side (bench/).
   */
  end(): void {
    this.#writer.close().catch(ignore);
    const drain = (result: ReadableStreamReadResult<Uint8Array>) => {
      if (!result.done) this.#reader.read().then(drain, ignore);
    };
    this.#reader.read().then(drain, ignore);
  }
}

function ignore(): void {}

/** A compressor that sync-flushes every push: each output ends in 00 00 ff ff. */
export interface Flusher {
  readonly maxSlice: number;
  push(bytes: Uint8Array): Promise<Uint8Array | undefined>;
  end(): void;
}

/** {@linkcode Flusher} over a node:zlib raw deflate stream. */
export class ZlibFlusher implements Flusher {
  readonly maxSlice = Infinity;
  #deflate: zlib.DeflateRaw;
  #chunks: Uint8Array[] = [];
  #failed = false;

  constructor(settings: DeflateSettings) {
    this.#deflate = zlib.createDeflateRaw(zlibOptions(settings));
    this.#deflate.on("data", (chunk: Uint8Array) => this.#chunks.push(chunk));
    this.#deflate.on("error", () => this.#failed = true);
  }

  push(bytes: Uint8Array): Promise<Uint8Array | undefined> {
    return new Promise((resolve) => {
      this.#deflate.write(bytes);
      // The flush's output has been emitted as "data" when this runs.
      this.#deflate.flush(zlib.constants.Z_SYNC_FLUSH, () => {
        const chunks = this.#chunks.splice(0);
        resolve(this.#failed ? undefined : concat(chunks));
      });
    });
  }

  end(): void {
    this.#deflate.close();
  }
}

export function endsWith(data: Uint8Array, suffix: Uint8Array): boolean {
  if (data.length < suffix.length) return false;
  const offset = data.length - suffix.length;
  for (let i = 0; i < suffix.length; i++) {
    if (data[offset + i] !== suffix[i]) return false;
  }
  return true;
}

/**
 * Compresses one message, possibly in pieces (a streaming writer), with a
 * fresh CompressionStream (no context takeover, RFC 7692 section 7.1.1) or
 * a connection's context-takeover stream.
 *
 * Each `write()` returns the bytes to send for that piece. The first write
 * always returns at least one byte (an empty message compresses to `00`,
 * RFC 7692 section 7.2.3.6), so a writer closed without data should still
 * write an empty piece once. Call `close()` when the message is done.
 */
export class MessageDeflater {
  #driver: Flusher;
  /** The driver is this message's own, ended with it. */
  #owned: boolean;
  // The previous piece's 00 00 ff ff, held back in case it was the last one.
  #holdingTail = false;
  #broken = false;

  /**
   * @param settings The window and level; see {@linkcode DeflateSettings}.
   * @param shared A stream that outlives the message (context takeover).
   */
  constructor(settings: DeflateSettings, shared?: Flusher) {
    this.#owned = shared === undefined;
    this.#driver = shared ??
      (needsZlib(settings)
        ? new ZlibFlusher(settings)
        : new StreamDriver(new CompressionStream("deflate-raw")));
  }

  /**
   * Compresses `data` as the next piece of the message.
   *
   * @returns the bytes to send, or undefined when the stream did not end in
   * the expected `00 00 ff ff` (the message must then not go out compressed;
   * pieces already sent cannot be recalled, so Conn fails the message)
   */
  async write(data: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.#broken) return undefined;
    if (data.length === 0 && this.#holdingTail) return new Uint8Array(0);
    const parts: Uint8Array[] = this.#holdingTail ? [SYNC_TAIL] : [];
    let offset = 0;
    do {
      const end = Math.min(offset + this.#driver.maxSlice, data.length);
      let chunk: Uint8Array | undefined;
      try {
        chunk = await this.#driver.push(data.subarray(offset, end));
      } catch {
        chunk = undefined; // the stream was closed under us
      }
      // Every write is sync-flushed, so every chunk ends in the marker.
      if (chunk === undefined || !endsWith(chunk, SYNC_TAIL)) {
        this.#broken = true;
        return undefined;
      }
      parts.push(chunk);
      offset = end;
    } while (offset < data.length);
    const last = parts[parts.length - 1];
    parts[parts.length - 1] = last.subarray(0, last.length - SYNC_TAIL.length);
    this.#holdingTail = true;
    return parts.length === 1 ? parts[0] : concat(parts);
  }

  /**
   * Ends the message: the held-back `00 00 ff ff` is dropped (section
   * 7.2.1), and a stream of the message's own is freed.
   */
  close(): void {
    if (this.#owned) this.#driver.end();
  }
}

/**
 * Compresses a whole message for a frame with RSV1 set (RFC 7692 section
 * 7.2.1), on its own or through a connection's context-takeover stream.
 *
 * @returns the payload, or undefined when the compressor's output did not end
 * as expected: send the message uncompressed then
 */
export async function compressMessage(
  data: Uint8Array,
  settings: DeflateSettings,
  shared?: Flusher,
): Promise<Uint8Array | undefined> {
  if (shared === undefined && needsZlib(settings)) {
    return await zlibCompress(data, settings);
  }
  const deflater = new MessageDeflater(settings, shared);
  try {
    return await deflater.write(data);
  } finally {
    deflater.close();
  }
}

/** One message through node:zlib; undefined when its output is malformed. */
async function zlibCompress(
  data: Uint8Array,
  settings: DeflateSettings,
): Promise<Uint8Array | undefined> {
  const options = zlibOptions(settings);
  let out: Uint8Array;
  try {
    out = data.length <= SYNC_COMPRESS_LIMIT
      ? zlib.deflateRawSync(data, options)
      : await new Promise<Uint8Array>((resolve, reject) =>
        zlib.deflateRaw(
          data,
          options,
          (error, result) => error ? reject(error) : resolve(result),
        )
      );
  } catch {
    return undefined;
  }
  if (!endsWith(out, SYNC_TAIL)) return undefined;
  return new Uint8Array(
    out.buffer,
    out.byteOffset,
    out.length - SYNC_TAIL.length,
  );
}

/** Options of {@linkcode MessageInflater.inflate}. */
export interface InflateOptions {
  /** Whether `data` ends the message (the frame had FIN set). */
  final: boolean;
  /**
   * Most inflated bytes the whole message may have (the read limit);
   * `Infinity` for none.
   */
  limit: number;
}

function isStreamEnd(error: unknown): boolean {
  return error instanceof Error &&
    error.message.includes("failed to write whole buffer");
}

/**
 * Inflates the compressed messages of one connection, one at a time, piece by
 * piece (RFC 7692 section 7.2.2).
 *
 * A DecompressionStream is kept between messages: peers negotiated to no
 * context takeover never refer back across a message, and the sentinel block
 * checked at each message's end proves the stream sits between blocks, so
 * reusing it saves the ~10 us a fresh stream costs. A message that ends in a
 * final block ends that stream; the next message gets a new one.
 *
 * Input goes in slices of at most `remaining limit / 1032` bytes, so no single
 * write can inflate much past the limit: a 256 MiB bomb is refused after
 * about `limit` bytes. One `inflate()` at a time; call `close()` when the
 * connection ends (or to free the stream while the connection idles).
 */
export class MessageInflater {
  #driver: StreamDriver | undefined;
  #produced = 0; // inflated bytes of the current message
  #started = false; // a piece of the current message was written
  #held = -1; // the last byte given so far, not yet written (-1: none)
  #ended = false; // the current message's final block has been seen
  #closes = 0; // counts close() calls, to tell a call cut short by one

  /**
   * Inflates the next piece of the current message.
   *
   * @returns the inflated chunks (possibly none), which the caller owns
   * @throws {InflateError} code 1007 on corrupt data, 1009 past the limit;
   * the inflater is closed then
   */
  async inflate(
    data: Uint8Array,
    options: InflateOptions,
  ): Promise<Uint8Array[]> {
    const out: Uint8Array[] = [];
    const closes = this.#closes;
    try {
      const { final, limit } = options;
      if (
        final && !this.#started &&
        data.length <= this.#sliceSize(limit) - SENTINEL.length
      ) {
        // The common case: a whole message in one write with its tail.
        const input = new Uint8Array(data.length + SENTINEL.length);
        input.set(data);
        input.set(SENTINEL, data.length);
        let chunk: Uint8Array | undefined;
        try {
          chunk = await this.#push(input);
        } catch (error) {
          if (!isStreamEnd(error)) throw error;
          // A final block lost this write's output: replay the message on a
          // fresh stream write by write (no context takeover makes it safe).
          this.#discard();
        }
        if (this.#driver !== undefined) {
          this.#finish(chunk, limit, out);
          return out;
        }
      }
      await this.#inflatePieces(data, options, out);
      return out;
    } catch (error) {
      if (closes !== this.#closes) {
        throw new InflateError(
          1007,
          "Cannot inflate message: the inflater was closed during the call",
          { cause: error },
        );
      }
      this.close();
      throw asInflateError(error);
    }
  }

  /**
   * Frees the DecompressionStream and forgets the current message. A later
   * `inflate()` starts a new stream (and must begin a new message).
   */
  close(): void {
    this.#closes++;
    this.#discard();
    this.#endMessage();
  }

  #discard(): void {
    this.#driver?.cancel();
    this.#driver = undefined;
  }

  #endMessage(): void {
    if (this.#ended) this.#discard(); // that stream is over
    this.#produced = 0;
    this.#started = false;
    this.#held = -1;
    this.#ended = false;
  }

  #push(bytes: Uint8Array): Promise<Uint8Array | undefined> {
    this.#driver ??= new StreamDriver(new DecompressionStream("deflate-raw"));
    return this.#driver.push(bytes);
  }

  /**
   * Writes bytes that may follow a final block. DecompressionStream then
   * rejects the write, but as the stream ended before these bytes (a write
   * that straddles the end is never made) no output is lost: the message is
   * complete and whatever follows is ignored, as zlib does.
   */
  async #pushTrailer(
    bytes: Uint8Array,
  ): Promise<Uint8Array | undefined> {
    try {
      return await this.#push(bytes);
    } catch (error) {
      if (!isStreamEnd(error)) throw error;
      this.#ended = true;
      return undefined;
    }
  }

  #sliceSize(limit: number): number {
    const remaining = limit - this.#produced;
    const size = Math.floor(remaining / MAX_EXPANSION);
    return Math.max(MIN_INFLATE_SLICE, Math.min(MAX_SLICE, size));
  }

  #collect(chunk: Uint8Array | undefined, limit: number, out: Uint8Array[]) {
    if (chunk === undefined || chunk.length === 0) return;
    this.#produced += chunk.length;
    if (this.#produced > limit) {
      throw new InflateError(
        1009,
        `Cannot inflate message: it exceeds the read limit of ${limit} bytes`,
      );
    }
    out.push(chunk);
  }

  /** Checks and strips the sentinel of a message's last write. */
  #finish(chunk: Uint8Array | undefined, limit: number, out: Uint8Array[]) {
    if (chunk === undefined || !endsWith(chunk, SENTINEL_TEXT)) {
      throw new InflateError(
        1007,
        "Cannot inflate message: the DEFLATE data ends inside a block",
      );
    }
    this.#collect(
      chunk.subarray(0, chunk.length - SENTINEL_TEXT.length),
      limit,
      out,
    );
    this.#endMessage();
  }

  /**
   * The general path. The last byte seen is always held back and written on
   * its own, and so is the sentinel: a peer that ends the message with a final
   * block (RFC 7692 section 7.2.3.4), possibly followed by the one-byte empty
   * block section 7.2.1 adds, then makes one of those lone writes fail, never
   * a slice carrying output.
   */
  async #inflatePieces(
    data: Uint8Array,
    { final, limit }: InflateOptions,
    out: Uint8Array[],
  ): Promise<void> {
    this.#started = true;
    if (!this.#ended && data.length > 0) {
      if (this.#held >= 0) {
        const held = new Uint8Array([this.#held]);
        this.#collect(await this.#pushTrailer(held), limit, out);
      }
      const bodyEnd = data.length - 1;
      let offset = 0;
      while (!this.#ended && offset < bodyEnd) {
        const end = Math.min(offset + this.#sliceSize(limit), bodyEnd);
        let chunk: Uint8Array | undefined;
        try {
          chunk = await this.#push(data.subarray(offset, end));
        } catch (error) {
          if (!isStreamEnd(error)) throw error;
          throw new InflateError(
            1007,
            "Cannot inflate message: data follows the final DEFLATE block",
            { cause: error },
          );
        }
        this.#collect(chunk, limit, out);
        offset = end;
      }
      this.#held = data[bodyEnd];
    }
    if (!final) return;
    if (!this.#ended && this.#held >= 0) {
      const held = new Uint8Array([this.#held]);
      this.#collect(await this.#pushTrailer(held), limit, out);
    }
    const chunk = this.#ended ? undefined : await this.#pushTrailer(SENTINEL);
    if (this.#ended) return this.#endMessage();
    this.#finish(chunk, limit, out);
  }
}

/**
 * Compressed payloads of messages written to many connections, made on first
 * use: with no context takeover a message compresses the same on every
 * connection, as gorilla's prepared frames do.
 */
const compressedPayloads = new WeakMap<
  { readonly data: Uint8Array },
  Map<string, Promise<Uint8Array | undefined>>
>();

/**
 * The compressed payload of a prepared message, shared by its writes with
 * the same settings (as gorilla keys its prepared frames by level).
 */
export function compressedPayloadOf(
  message: { readonly data: Uint8Array },
  settings: DeflateSettings,
): Promise<Uint8Array | undefined> {
  let bySettings = compressedPayloads.get(message);
  if (bySettings === undefined) {
    bySettings = new Map();
    compressedPayloads.set(message, bySettings);
  }
  const key = `${settings.level}/${settings.windowBits}`;
  let compressed = bySettings.get(key);
  if (compressed === undefined) {
    // compressMessage() never rejects: a failure resolves to undefined.
    compressed = compressMessage(message.data, settings);
    bySettings.set(key, compressed);
  }
  return compressed;
}

/**
 * Compresses one message sent in fragments (RFC 7692 section 6.1): every
 * fragment carries the compressed bytes of its piece, RSV1 on the first.
 */
export class FragmentCompressor {
  /** Compress once the message reaches this size. */
  readonly #threshold: number;
  readonly #settings: DeflateSettings;
  readonly #shared: Flusher | undefined;
  #deflater: MessageDeflater | undefined;
  #started = false;

  /**
   * @param threshold Messages ending below it go out uncompressed.
   * @param settings The window and level to compress with.
   * @param shared The connection's context-takeover stream, if it has one.
   */
  constructor(
    threshold: number,
    settings: DeflateSettings,
    shared: Flusher | undefined,
  ) {
    this.#threshold = threshold;
    this.#settings = settings;
    this.#shared = shared;
  }

  /**
   * Compresses the next fragment. Resolves undefined when it goes out
   * uncompressed, which only the first one can: a message that ends within
   * it below the threshold, or a compressor failure before anything is sent.
   *
   * @throws {ProtocolError} A later fragment failed after RSV1 went out
   * (1011): the message cannot be finished.
   */
  async compress(
    payload: Uint8Array,
    fin: boolean,
  ): Promise<Uint8Array | undefined> {
    const first = !this.#started;
    this.#started = true;
    if (first && fin && payload.length < this.#threshold) return undefined;
    // Past the first fragment without a deflater: the message is plain.
    if (!first && this.#deflater === undefined) return undefined;
    this.#deflater ??= new MessageDeflater(this.#settings, this.#shared);
    const compressed = await this.#deflater.write(payload);
    if (compressed === undefined) {
      this.close();
      if (first) return undefined;
      throw new ProtocolError(
        "Cannot write message fragment: the compressor's output was malformed",
        CLOSE_CODE.InternalServerErr,
      );
    }
    if (fin) this.close();
    return compressed;
  }

  /** Frees the compressor (the message is done or abandoned). */
  close(): void {
    this.#deflater?.close();
    this.#deflater = undefined;
  }
}
