// The write side of a Conn: frames are encoded into coalescing buffers and
// written in batches, in order, with backpressure; data messages keep their
// order behind streamed ones (nextWriter) and behind compression. It never
// looks at read state: its one hook (WriterHooks.fail) hands a protocol
// error found while writing to the closing logic.

import {
  giveBack,
  holdWhileWriting,
  POOLED_PAYLOAD,
  takePayloadBuffer,
} from "./_payload_pool.ts";
import {
  CLOSE_CODE,
  CloseError,
  CloseSentError,
  type DataMessageType,
  headerLength,
  MAX_CONTROL_PAYLOAD,
  MAX_HEADER_LENGTH,
  MESSAGE_TYPE,
  type MessageType,
  OPCODE,
  type ProtocolError,
  writeHeader,
} from "./frame.ts";
import { Deadline, isAbort } from "./_deadline.ts";
import { maskInPlace } from "./_mask.ts";
import {
  compressedPayloadOf,
  compressMessage,
  type DeflateSettings,
  type Flusher,
  FragmentCompressor,
} from "./_deflate_stream.ts";
import { ContextDeflater } from "./_deflate_context.ts";

/** What a {@linkcode Writer} needs from its transport. */
export interface WriteTransport {
  write(data: Uint8Array): Promise<number>;
}

/**
 * A pool of write buffers shared by many connections, so that idle
 * connections hold none (gorilla's `WriteBufferPool`).
 *
 * @example A simple shared pool
 * ```ts title="Sharing write buffers"
 * import { type BufferPool, Conn, MESSAGE_TYPE } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const free: Uint8Array[] = [];
 * const pool: BufferPool = { get: () => free.pop(), put: (b) => free.push(b) };
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const conn = new Conn(socket, { role: "server", writeBufferPool: pool });
 * await conn.writeControl(MESSAGE_TYPE.Ping);
 * assert.equal(free.length, 1); // the buffer went back once written
 * conn.close();
 * peer.close();
 * ```
 */
export interface BufferPool {
  /** Returns a buffer, or `undefined` when the pool is empty. */
  get(): Uint8Array | undefined;
  /** Gives a buffer back once the connection no longer uses it. */
  put(buffer: Uint8Array): void;
}

/** Streams one message out as fragments, as `Conn.nextWriter` gives it. */
export interface MessageWriter extends AsyncDisposable {
  /** Appends bytes (or the UTF-8 of a string) to the message. */
  write(data: Uint8Array | string): Promise<void>;
  /** Sends the final fragment; the message is complete. */
  close(): Promise<void>;
}

/** Options of `Conn.writeMessage`. */
export interface WriteOptions {
  /**
   * Aborts the wait for room in the queue or for the socket. The frame may
   * already be queued, so an aborted write leaves the write side failed:
   * every later write rejects with the same reason.
   */
  signal?: AbortSignal;
}

/** Options of `Conn.writeControl`. */
export interface WriteControlOptions {
  /** Gives up (and fails the write side) when the frame is not sent by then. */
  deadline?: Date;
}

const encoder = new TextEncoder();
const RESOLVED: Promise<void> = Promise.resolve();
const noop = () => {};

/**
 * Bytes queued for the socket beyond which a write waits until its frame is
 * written (backpressure); below it a write resolves once queued, so a
 * sequential echo loop still coalesces.
 */
const HIGH_WATER = 16 * 1024;
/** Bytes queued beyond which further messages wait before being queued. */
const QUEUE_LIMIT = 4 * HIGH_WATER;
/** Payloads from this size are written as their own write, not copied. */
export const COPY_LIMIT = 4096;
/**
 * Free bytes in front of a large message's payload as the reader returns it:
 * a server's frame header (at most 10 bytes, unmasked) fits there, so
 * echoing the message writes header and payload as one piece.
 */
export const FRAME_HEADROOM = 10;
/**
 * Buffers of payloads returned with FRAME_HEADROOM free bytes in front. An
 * entry is used up by the first write of its payload: a second write, even
 * of another type on another connection, cannot overwrite a header still
 * queued.
 */
export const headroomBuffers = new WeakSet<ArrayBufferLike>();
/** The RSV1 bit of a frame's first byte: a compressed message (RFC 7692). */
const RSV1 = 0x40;
/**
 * Write buffers whose frames are written, shared by every connection without
 * a `writeBufferPool` and keyed by size: an idle connection then holds no
 * write buffer at all, while busy ones still reuse theirs.
 */
const freeWriteBuffers = new Map<number, Uint8Array[]>();
/**
 * Most free write buffers kept per size: as many as writes were in flight at
 * once, up to 1 MiB of default-sized ones. A server answering a burst from
 * many connections needs one per connection; dropping them turns every
 * burst into garbage (a storm of 10,000 new connections left ~40 MB).
 */
const FREE_WRITE_BUFFERS = 256;

/** Crypto-random masking keys (RFC 6455 section 5.3), fetched 64 at a time. */
const keyPool = new Uint8Array(256);
let keyPoolOffset = keyPool.length;

/** Fills `key` with the next 4 crypto-random bytes. */
function nextMaskKey(key: Uint8Array): Uint8Array {
  if (keyPoolOffset === keyPool.length) {
    crypto.getRandomValues(keyPool);
    keyPoolOffset = 0;
  }
  key[0] = keyPool[keyPoolOffset];
  key[1] = keyPool[keyPoolOffset + 1];
  key[2] = keyPool[keyPoolOffset + 2];
  key[3] = keyPool[keyPoolOffset + 3];
  keyPoolOffset += 4;
  return key;
}

/** The bytes of a payload given as bytes or a string (its UTF-8). */
export function toBytes(data: Uint8Array | string, action: string): Uint8Array {
  if (typeof data === "string") return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  throw new TypeError(
    `Cannot ${action}: data must be a Uint8Array or a string`,
  );
}

/** Whether `type` is text or binary. */
export function isDataType(type: number): type is DataMessageType {
  return type === MESSAGE_TYPE.Text || type === MESSAGE_TYPE.Binary;
}

/** Whether `type` is close, ping or pong. */
export function isControlType(type: number): boolean {
  return type === MESSAGE_TYPE.Close || type === MESSAGE_TYPE.Ping ||
    type === MESSAGE_TYPE.Pong;
}

/**
 * A message encoded once and written to many connections
 * (gorilla's `PreparedMessage`): the frame is built once per role.
 *
 * @example Broadcast one message
 * ```ts title="Writing a prepared message"
 * import { Conn, MESSAGE_TYPE, PreparedMessage } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [serverSocket, clientSocket] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const server = new Conn(serverSocket, { role: "server" });
 * const client = new Conn(clientSocket, { role: "client" });
 *
 * const prepared = new PreparedMessage(MESSAGE_TYPE.Text, "news");
 * await server.writePreparedMessage(prepared);
 * const { data } = await client.readMessage();
 * assert.equal(new TextDecoder().decode(data), "news");
 * await Promise.all([client.closeGracefully(), server.closeGracefully()]);
 * ```
 */
export class PreparedMessage {
  /** The message type. */
  readonly type: MessageType;
  /** The payload. */
  readonly data: Uint8Array;

  /**
   * Prepares a message.
   *
   * @param type The message type (data or control).
   * @param data The payload, or a string sent as its UTF-8.
   * @throws {TypeError} The type is not a message type.
   * @throws {RangeError} A control payload exceeds 125 bytes.
   */
  constructor(type: MessageType, data: Uint8Array | string) {
    if (!isDataType(type) && !isControlType(type)) {
      throw new TypeError(
        `Cannot prepare message: ${type} is not a message type`,
      );
    }
    const bytes = toBytes(data, "prepare message").slice();
    if (isControlType(type) && bytes.length > MAX_CONTROL_PAYLOAD) {
      throw new RangeError(
        `Cannot prepare message: a control payload of ${bytes.length} bytes exceeds 125`,
      );
    }
    this.type = type;
    this.data = bytes;
  }
}

/** Unmasked frames of prepared messages, built on first use by a server. */
const serverFrames = new WeakMap<PreparedMessage, Uint8Array>();

function serverFrameOf(message: PreparedMessage): Uint8Array {
  let frame = serverFrames.get(message);
  if (frame === undefined) {
    const length = message.data.length;
    frame = new Uint8Array(headerLength(length, false) + length);
    const size = writeHeader(frame, 0, 0x80 | message.type, length, undefined);
    frame.set(message.data, size);
    serverFrames.set(message, frame);
  }
  return frame;
}

/**
 * One batch of frames written together. Its promise is made only when
 * someone waits for it: most batches (writes below the high-water mark
 * resolve at once) settle with nobody asking, and an echo writes one batch
 * per message.
 */
class Batch {
  /** Someone waits for this batch: it must not be held back by a cork. */
  urgent = false;
  #deferred: PromiseWithResolvers<void> | undefined;
  #settled = false;
  #failed = false;
  #error: unknown;

  get promise(): Promise<void> {
    if (this.#deferred === undefined) {
      this.#deferred = Promise.withResolvers<void>();
      // Its failure is also reported on the next write, so nobody has to
      // observe this rejection.
      this.#deferred.promise.catch(noop);
      if (this.#settled) this.#settle();
    }
    return this.#deferred.promise;
  }

  resolve(): void {
    this.#settled = true;
    this.#settle();
  }

  reject(error: unknown): void {
    this.#settled = this.#failed = true;
    this.#error = error;
    this.#settle();
  }

  #settle(): void {
    if (this.#failed) this.#deferred?.reject(this.#error);
    else this.#deferred?.resolve();
  }
}

/** A place in the order of data messages: `ready` when it is due. */
interface Lock {
  ready: Promise<void>;
  release: () => void;
}

/** How the write side is set up. */
export interface WriterOptions {
  /** Mask every frame (the client role). */
  client: boolean;
  /** Size of a coalescing buffer, and of a streamed message's fragments. */
  bufferSize: number;
  /** Where write buffers come from; undefined: a pool shared by size. */
  pool: BufferPool | undefined;
  /** Compress data messages from this size; -1: never (not negotiated). */
  compressionThreshold: number;
  /** How to compress, when the threshold allows it. */
  deflate: DeflateSettings | undefined;
}

/** What the writer asks of the rest of the connection. */
export interface WriterHooks {
  /** Fail the connection: send the error's close code, then close. */
  fail(error: ProtocolError): void;
}

/** The write side of a connection (see the top of this file). */
export class Writer {
  readonly #transport: WriteTransport;
  readonly #client: boolean;
  readonly #bufferSize: number;
  readonly #pool: BufferPool | undefined;
  readonly #threshold: number;
  readonly #hooks: WriterHooks;
  /** Written messages are compressed when the extension allows it. */
  compressWrites = true;
  /** How written messages are compressed (the level can change). */
  deflate: DeflateSettings | undefined;
  /** The one compressor of every message, with context takeover. */
  readonly #context: ContextDeflater | undefined;
  /**
   * The reader is working through frames already buffered: frames written
   * meanwhile wait for it (see {@linkcode Writer.uncork}).
   */
  burst = false;
  /** The buffer small frames are being coalesced into. */
  #wbuf: Uint8Array | undefined;
  #wstart = 0;
  #wlen = 0;
  // The lists below are made when first needed and dropped once used, so
  // an idle connection holds none of them.
  /** Completed pieces of the batch being assembled, in order. */
  #segments: Uint8Array[] | undefined;
  /** Write buffers used by the batch being assembled. */
  #batchBuffers: Uint8Array[] | undefined;
  /** Pooled memory of masked payloads queued since the last batch. */
  #scratch: ArrayBuffer[] | undefined;
  #batch: Batch | undefined;
  #inFlight: Batch | undefined;
  /** Bytes queued or in flight. */
  #queued = 0;
  #roomWaiters: (() => void)[] | undefined;
  /** Made on first use: a Conn that never sets one pays nothing for it. */
  #deadline: Deadline | undefined;
  #error: unknown;
  #closeSent = false;
  #lockTail: Promise<void> = RESOLVED;
  #lockCount = 0;
  /** A client's masking key, refilled for every frame. */
  #maskKey: Uint8Array | undefined;
  #uncorkTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    transport: WriteTransport,
    options: WriterOptions,
    hooks: WriterHooks,
  ) {
    this.#transport = transport;
    this.#hooks = hooks;
    this.#client = options.client;
    this.#bufferSize = options.bufferSize;
    this.#pool = options.pool;
    this.#threshold = options.deflate === undefined
      ? -1
      : options.compressionThreshold;
    this.deflate = options.deflate;
    if (options.deflate?.contextTakeover) {
      this.#context = new ContextDeflater(options.deflate);
    }
  }

  /** The context-takeover compressor at the current settings, if any. */
  get sharedDeflater(): Flusher | undefined {
    return this.#context?.use(this.deflate!);
  }

  /** Why the write side failed for good, or undefined. */
  get error(): unknown {
    return this.#error;
  }

  /** A close frame was queued: only control frames other than close remain. */
  get closeSent(): boolean {
    return this.#closeSent;
  }

  /** Whether a reply (pong, close echo) may still be written. */
  get canReply(): boolean {
    return !this.#closeSent && this.#error === undefined;
  }

  /** Size of a fragment of a streamed message. */
  get fragmentSize(): number {
    return this.#bufferSize;
  }

  /** Why a write must be refused now, or undefined. */
  blocked(action: string): unknown {
    if (this.#error !== undefined) return this.#error;
    if (this.#closeSent) {
      return new CloseSentError(
        `Cannot ${action}: a close frame was already sent`,
      );
    }
    return undefined;
  }

  /** Fails the connection with a protocol error found while writing. */
  fail(error: ProtocolError): void {
    this.#hooks.fail(error);
  }

  /** Moves the write deadline (0: none). */
  setDeadline(at: number): void {
    if (at !== 0 || this.#deadline !== undefined) {
      (this.#deadline ??= new Deadline("write")).set(at);
    }
  }

  /**
   * Writes a data message (`bytes` checked by the caller); `borrowed` when
   * the bytes are the caller's own rather than a string's encoding.
   */
  writeMessage(
    type: DataMessageType,
    bytes: Uint8Array,
    borrowed: boolean,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const blocked = this.blocked("write message");
    if (blocked !== undefined) return Promise.reject(blocked);
    let written: Promise<void>;
    // Whether the bytes were copied before this returns; if not, they are
    // held until written (not until an abort gives up waiting: the frame
    // stays queued).
    let copied = bytes.length < COPY_LIMIT;
    if (this.#compressing(bytes.length)) {
      // Compressed later, in turn: like a small frame copied into the write
      // buffer, a small payload is the caller's again once this returns.
      if (borrowed && copied) bytes = bytes.slice();
      written = this.#writeLocked(0x80 | type, bytes, true);
    } else if (this.#lockCount === 0 && this.#queued <= QUEUE_LIMIT) {
      written = this.append(0x80 | type, bytes, false);
    } else {
      written = this.#writeLocked(0x80 | type, bytes);
      copied = false;
    }
    if (!copied) holdWhileWriting(bytes, written);
    return signal === undefined ? written : this.#bounded(written, 0, signal);
  }

  /** Writes a prepared data message; a server reuses its encoded frame. */
  writePrepared(message: PreparedMessage): Promise<void> {
    const type = message.type as DataMessageType;
    if (this.#compressing(message.data.length)) {
      const blocked = this.blocked("write prepared message");
      if (blocked !== undefined) return Promise.reject(blocked);
      return this.#writeLocked(0x80 | type, message.data, message);
    }
    if (this.#client) {
      return this.writeMessage(type, message.data, true, undefined);
    }
    const blocked = this.blocked("write prepared message");
    if (blocked !== undefined) return Promise.reject(blocked);
    if (this.#lockCount === 0 && this.#queued <= QUEUE_LIMIT) {
      return this.#appendRaw(serverFrameOf(message));
    }
    return this.#writeLocked(0x80 | type, message.data);
  }

  /**
   * Writes a control frame (checked by the caller, write side not blocked)
   * and resolves once it is written, by `deadline` when not 0.
   */
  writeControl(
    type: MessageType,
    bytes: Uint8Array,
    deadline: number,
  ): Promise<void> {
    if (type === MESSAGE_TYPE.Close) this.#closeSent = true;
    const written = this.append(0x80 | type, bytes, true);
    if (deadline === 0) return written;
    return this.#bounded(written, deadline, undefined);
  }

  /** Starts a message sent in fragments (see `Conn.nextWriter`). */
  nextWriter(type: DataMessageType): MessageWriter {
    return new FragmentWriter(
      this,
      type,
      this.#acquireLock(),
      this.#threshold >= 0 && this.compressWrites ? this.#threshold : -1,
    );
  }

  /** Whether a data message of `length` bytes goes out compressed. */
  #compressing(length: number): boolean {
    return this.#threshold >= 0 && this.compressWrites &&
      length >= this.#threshold;
  }

  /**
   * Slow path of a message write: in turn behind writers and a full queue.
   * With `compress` (or a prepared message, whose compressed payload is
   * shared unless this end keeps its context) the payload is compressed in
   * turn, which keeps messages in order however long each compression
   * takes, and with context takeover keeps the compressor's window in the
   * order the peer inflates; RSV1 marks it (RFC 7692 section 6). A payload
   * the compressor fails on goes out uncompressed.
   */
  async #writeLocked(
    b0: number,
    payload: Uint8Array,
    compress?: true | PreparedMessage,
  ): Promise<void> {
    const lock = this.#acquireLock();
    let written: Promise<void>;
    try {
      await lock.ready;
      if (compress !== undefined) {
        const shared = this.sharedDeflater;
        const compressed = compress === true || shared !== undefined
          ? await compressMessage(payload, this.deflate!, shared)
          : await compressedPayloadOf(compress, this.deflate!);
        if (compressed !== undefined) {
          b0 |= RSV1;
          payload = compressed;
        }
      }
      await this.room();
      const blocked = this.blocked("write message");
      if (blocked !== undefined) throw blocked;
      written = this.append(b0, payload, false);
    } finally {
      lock.release();
    }
    return written;
  }

  /** Takes a place in the order of data messages; `ready` when it is due. */
  #acquireLock(): Lock {
    this.#lockCount++;
    const ready = this.#lockTail;
    const { promise, resolve } = Promise.withResolvers<void>();
    this.#lockTail = promise;
    let released = false;
    return {
      ready,
      release: () => {
        if (released) return;
        released = true;
        this.#lockCount--;
        resolve();
      },
    };
  }

  /** Resolves once the queue is below its limit (or the write side failed). */
  room(): Promise<void> {
    if (this.#queued <= QUEUE_LIMIT || this.#error !== undefined) {
      return RESOLVED;
    }
    return new Promise<void>((resolve) =>
      (this.#roomWaiters ??= []).push(resolve)
    ).then(() => this.room());
  }

  #wakeRoom(): void {
    const waiters = this.#roomWaiters;
    if (waiters === undefined) return;
    this.#roomWaiters = undefined;
    for (const wake of waiters) wake();
  }

  /**
   * Queues one frame. Small frames are copied into the coalescing buffer; a
   * large server payload is queued by reference as its own write, so the
   * caller must wait for it to be written before reusing its bytes.
   * Resolves at once while the queue is short, unless `wait`.
   */
  append(b0: number, payload: Uint8Array, wait: boolean): Promise<void> {
    const length = payload.length;
    // The key is used up before append returns, so one per connection
    // serves every frame.
    const key = this.#client
      ? nextMaskKey(this.#maskKey ??= new Uint8Array(4))
      : undefined;
    const size = headerLength(length, this.#client) + length;
    let byReference = false;
    if (length < COPY_LIMIT) {
      const buf = this.#reserve(size);
      const at = this.#wlen;
      const headerSize = writeHeader(buf, at, b0, length, key);
      const body = buf.subarray(at + headerSize, at + size);
      body.set(payload);
      if (key !== undefined) maskInPlace(body, key, 0);
      this.#wlen = at + size;
    } else if (
      key === undefined && payload.byteOffset === FRAME_HEADROOM &&
      headroomBuffers.delete(payload.buffer)
    ) {
      // A payload a Conn read with headroom: its header goes in front of it
      // and the frame leaves in one write, not two.
      const start = FRAME_HEADROOM - headerLength(length, false);
      const frame = new Uint8Array(payload.buffer, start, size);
      writeHeader(frame, 0, b0, length, undefined);
      this.#cutSegment();
      (this.#segments ??= []).push(frame);
      byReference = true;
    } else {
      const buf = this.#reserve(MAX_HEADER_LENGTH);
      this.#wlen += writeHeader(buf, this.#wlen, b0, length, key);
      this.#cutSegment();
      if (key !== undefined) {
        (this.#segments ??= []).push(this.#maskedCopy(payload, key));
      } else {
        (this.#segments ??= []).push(payload);
        byReference = true;
      }
    }
    return this.#queue(size, wait || byReference);
  }

  /**
   * A client's payload masked into memory of its own (the caller's bytes
   * stay as they are). A large one borrows pooled memory, given back once
   * its batch is written, so a client sending large messages does not fault
   * in fresh pages for each.
   */
  #maskedCopy(payload: Uint8Array, key: Uint8Array): Uint8Array {
    let body: Uint8Array;
    if (payload.length < POOLED_PAYLOAD) {
      body = payload.slice();
    } else {
      const buffer = takePayloadBuffer(payload.length);
      (this.#scratch ??= []).push(buffer);
      body = new Uint8Array(buffer, 0, payload.length);
      body.set(payload);
    }
    maskInPlace(body, key, 0);
    return body;
  }

  /** Queues an already encoded frame (a prepared message). */
  #appendRaw(frame: Uint8Array): Promise<void> {
    if (frame.length < COPY_LIMIT) {
      const buf = this.#reserve(frame.length);
      buf.set(frame, this.#wlen);
      this.#wlen += frame.length;
    } else {
      this.#cutSegment();
      (this.#segments ??= []).push(frame);
    }
    return this.#queue(frame.length, false);
  }

  #queue(size: number, wait: boolean): Promise<void> {
    this.#queued += size;
    const batch = this.#batch ??= new Batch();
    const urgent = wait || this.#queued > HIGH_WATER;
    if (urgent) batch.urgent = true;
    if (this.#inFlight === undefined) {
      if (this.burst && !urgent) this.#cork();
      else this.uncork();
    }
    return urgent ? batch.promise : RESOLVED;
  }

  /**
   * Holds queued frames while the application works through messages that
   * are already buffered (an echo loop answering a pipelined burst): a
   * socket write completes within a few microtasks, so without this every
   * answer would leave in its own write. The frames go out when the reader
   * next waits for the transport, or after a macrotask at the latest.
   */
  #cork(): void {
    if (this.#uncorkTimer !== undefined) return;
    this.#uncorkTimer = setTimeout(() => this.uncork(), 0);
  }

  /** Starts writing whatever is queued (see {@linkcode Writer.#cork}). */
  uncork(): void {
    this.burst = false;
    if (this.#uncorkTimer !== undefined) {
      clearTimeout(this.#uncorkTimer);
      this.#uncorkTimer = undefined;
    }
    if (this.#inFlight === undefined && this.#batch !== undefined) {
      this.#flush();
    }
  }

  /** Returns a write buffer with `size` free bytes at `#wlen`. */
  #reserve(size: number): Uint8Array {
    let buf = this.#wbuf;
    if (buf !== undefined && buf.length - this.#wlen >= size) return buf;
    if (buf !== undefined) {
      this.#cutSegment();
      (this.#batchBuffers ??= []).push(buf);
    }
    const pooled = this.#pool === undefined
      ? freeWriteBuffers.get(this.#bufferSize)?.pop()
      : this.#pool.get();
    if (pooled !== undefined && pooled.length >= size) {
      buf = pooled;
    } else {
      // Too small for this frame: the pooled buffer goes straight back.
      if (pooled !== undefined) this.#recycle(pooled);
      buf = new Uint8Array(Math.max(size, this.#bufferSize));
    }
    this.#wbuf = buf;
    this.#wstart = this.#wlen = 0;
    return buf;
  }

  /** Ends the open piece of the coalescing buffer as a segment. */
  #cutSegment(): void {
    if (this.#wbuf !== undefined && this.#wlen > this.#wstart) {
      (this.#segments ??= []).push(
        this.#wbuf.subarray(this.#wstart, this.#wlen),
      );
      this.#wstart = this.#wlen;
    }
  }

  /** Writes batches until none is queued. Never rejects. */
  async #flush(): Promise<void> {
    while (this.#batch !== undefined) {
      if (this.burst && !this.#batch.urgent) {
        this.#cork();
        return;
      }
      const batch = this.#batch;
      this.#batch = undefined;
      this.#inFlight = batch;
      this.#cutSegment();
      const segments = this.#segments ?? [];
      this.#segments = undefined;
      const buffers = this.#batchBuffers ?? [];
      this.#batchBuffers = undefined;
      const scratch = this.#scratch;
      this.#scratch = undefined;
      if (this.#wbuf !== undefined) buffers.push(this.#wbuf);
      this.#wbuf = undefined;
      this.#wstart = this.#wlen = 0;
      let bytes = 0;
      try {
        // Written here rather than in a helper: one async call less per
        // batch, and an echo writes one batch per message.
        for (const segment of segments) {
          bytes += segment.length;
          let offset = 0;
          while (offset < segment.length) {
            const write = this.#transport.write(
              offset === 0 ? segment : segment.subarray(offset),
            );
            offset += this.#deadline === undefined
              ? await write
              : await this.#deadline.bound(write);
          }
        }
      } catch (error) {
        this.#failWrite(error);
        this.#inFlight = undefined;
        batch.reject(this.#error);
        this.#rejectQueued(this.#error);
        this.#wakeRoom();
        return;
      }
      this.#queued -= bytes;
      for (const buffer of buffers) this.#recycle(buffer);
      if (scratch !== undefined) scratch.forEach(giveBack);
      this.#inFlight = undefined;
      batch.resolve();
      this.#wakeRoom();
    }
  }

  #recycle(buffer: Uint8Array): void {
    if (this.#pool !== undefined) {
      this.#pool.put(buffer);
      return;
    }
    if (buffer.length !== this.#bufferSize) return;
    let free = freeWriteBuffers.get(buffer.length);
    if (free === undefined) freeWriteBuffers.set(buffer.length, free = []);
    if (free.length < FREE_WRITE_BUFFERS) free.push(buffer);
  }

  #rejectQueued(error: unknown): void {
    const batch = this.#batch;
    this.#batch = undefined;
    this.#segments = undefined;
    this.#batchBuffers = undefined;
    this.#scratch = undefined;
    this.#wbuf = undefined;
    this.#wstart = this.#wlen = 0;
    batch?.reject(error);
  }

  #failWrite(error: unknown): void {
    if (this.#error !== undefined) return;
    this.#error = error instanceof Deno.errors.TimedOut
      ? error
      : new CloseError(
        CLOSE_CODE.AbnormalClosure,
        `transport write failed: ${(error as Error)?.message ?? error}`,
        { cause: error },
      );
  }

  /**
   * Races a queued write against a deadline and a signal. The frame stays
   * queued, so giving up fails the write side for good, as a write deadline
   * does.
   */
  #bounded(
    written: Promise<void>,
    deadline: number,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const bounds = new Deadline("write");
    bounds.set(deadline);
    return bounds.bound(written, signal).catch((error) => {
      if (error instanceof Deno.errors.TimedOut) this.#failWrite(error);
      else if (isAbort(error, signal)) this.#error ??= error;
      throw error;
    });
  }

  /**
   * Settles once every frame queued so far is written (or failed);
   * undefined when nothing is queued.
   */
  flushed(): Promise<void> | undefined {
    return (this.#batch ?? this.#inFlight)?.promise;
  }

  /** The connection closed: fails every queued and later write. */
  close(error: unknown): void {
    this.#error ??= error;
    this.#context?.close();
    if (this.#uncorkTimer !== undefined) {
      clearTimeout(this.#uncorkTimer);
      this.#uncorkTimer = undefined;
    }
    this.#rejectQueued(this.#error);
    this.#wakeRoom();
  }
}

/** The streaming writer behind `Conn.nextWriter`. */
class FragmentWriter implements MessageWriter {
  #writer: Writer;
  #type: DataMessageType;
  #lock: Lock;
  #buffer: Uint8Array | undefined;
  #length = 0;
  #started = false;
  #closed = false;
  #chain: Promise<void>;
  /** Made when the message may be compressed. */
  #compressor: FragmentCompressor | undefined;
  /** A fragment failed: the message cannot be finished. */
  #error: unknown;

  /** @param threshold Compress when the message reaches it; -1: never. */
  constructor(
    writer: Writer,
    type: DataMessageType,
    lock: Lock,
    threshold: number,
  ) {
    this.#writer = writer;
    this.#type = type;
    this.#lock = lock;
    this.#chain = lock.ready;
    if (threshold >= 0) {
      this.#compressor = new FragmentCompressor(
        threshold,
        writer.deflate!,
        writer.sharedDeflater,
      );
    }
  }

  write(data: Uint8Array | string): Promise<void> {
    if (this.#closed) {
      return Promise.reject(
        new TypeError("Cannot write to message writer: it is closed"),
      );
    }
    let bytes: Uint8Array;
    try {
      bytes = toBytes(data, "write to message writer");
    } catch (error) {
      return Promise.reject(error);
    }
    return holdWhileWriting(bytes, this.#then(() => this.#write(bytes)));
  }

  close(): Promise<void> {
    if (this.#closed) return RESOLVED;
    this.#closed = true;
    const done = this.#then(() =>
      this.#emit(
        this.#buffer?.subarray(0, this.#length) ?? new Uint8Array(0),
        true,
      )
    );
    done.then(this.#lock.release, this.#lock.release);
    return done;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Runs `step` after the previous steps, keeping calls in order. */
  #then(step: () => Promise<void>): Promise<void> {
    const next = this.#chain.then(step);
    this.#chain = next.catch(noop);
    return next;
  }

  async #write(bytes: Uint8Array): Promise<void> {
    const size = this.#writer.fragmentSize;
    let offset = 0;
    while (offset < bytes.length) {
      if (this.#length === 0 && bytes.length - offset >= size) {
        // A whole fragment straight from the caller's bytes.
        await this.#emit(bytes.subarray(offset, offset + size), false, true);
        offset += size;
        continue;
      }
      this.#buffer ??= new Uint8Array(size);
      const n = Math.min(size - this.#length, bytes.length - offset);
      this.#buffer.set(bytes.subarray(offset, offset + n), this.#length);
      this.#length += n;
      offset += n;
      if (this.#length === size) {
        await this.#emit(this.#buffer, false, true);
      }
    }
  }

  /** Sends one fragment; waits until it is written when it borrows bytes. */
  async #emit(
    payload: Uint8Array,
    fin: boolean,
    borrowed = false,
  ): Promise<void> {
    if (this.#error !== undefined) throw this.#error;
    const writer = this.#writer;
    try {
      const blocked = writer.blocked("write message fragment");
      if (blocked !== undefined) throw blocked;
      let b0 = (fin ? 0x80 : 0) |
        (this.#started ? OPCODE.Continuation : this.#type);
      if (this.#compressor !== undefined) {
        let compressed: Uint8Array | undefined;
        try {
          compressed = await this.#compressor.compress(payload, fin);
        } catch (error) {
          writer.fail(error as ProtocolError);
          throw error;
        }
        if (compressed !== undefined) {
          if (!this.#started) b0 |= RSV1;
          payload = compressed;
          borrowed = false;
        }
      }
      await writer.room();
      this.#started = true;
      const written = writer.append(b0, payload, false);
      this.#length = 0;
      if (borrowed || fin) await written;
    } catch (error) {
      this.#error = error;
      this.#compressor?.close();
      throw error;
    }
  }
}
