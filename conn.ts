/**
 * {@linkcode Conn}: a WebSocket connection (RFC 6455) over any byte
 * {@linkcode Transport} such as `Deno.Conn` or `Deno.TlsConn`, with
 * gorilla/websocket's read and write API made idiomatic TypeScript.
 *
 * The Upgrader and the Dialer build a `Conn` after the opening handshake;
 * tests and custom transports can build one directly.
 *
 * @example Echo one message over loopback TCP
 * ```ts title="Two Conns over a loopback socket"
 * import { Conn, MESSAGE_TYPE } from "./conn.ts";
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
 * await client.writeMessage(MESSAGE_TYPE.Text, "hello");
 * const { type, data } = await server.readMessage();
 * await server.writeMessage(type, data);
 * const echoed = await client.readMessage();
 * assert.equal(new TextDecoder().decode(echoed.data), "hello");
 *
 * await Promise.all([client.closeGracefully(), server.closeGracefully()]);
 * ```
 *
 * @module
 */

import {
  CLOSE_CODE,
  type DataMessageType,
  formatCloseMessage,
  type FrameHeader,
  headerLength,
  isValidCloseCode,
  MAX_CONTROL_PAYLOAD,
  MAX_HEADER_LENGTH,
  MESSAGE_TYPE,
  type MessageType,
  OPCODE,
  parseClosePayload,
  parseHeader,
  ProtocolError,
  writeHeader,
} from "./frame.ts";
import { Deadline } from "./_deadline.ts";
import { maskInPlace } from "./_mask.ts";
import { Utf8Validator } from "./_utf8.ts";
import type { DeflateParameters } from "./deflate.ts";
import {
  canCompress,
  compressMessage,
  DEFAULT_COMPRESSION_THRESHOLD,
  InflateError,
  MessageDeflater,
  MessageInflater,
} from "./_deflate_stream.ts";

export {
  CLOSE_CODE,
  type CloseCode,
  type DataMessageType,
  formatCloseMessage,
  MESSAGE_TYPE,
  type MessageType,
  ProtocolError,
} from "./frame.ts";

/**
 * The byte stream a {@linkcode Conn} runs over. `Deno.Conn` and
 * `Deno.TlsConn` satisfy it as they are.
 *
 * @example A transport that counts the bytes written
 * ```ts title="Wrapping a Deno.Conn"
 * import { Conn, MESSAGE_TYPE, type Transport } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * let written = 0;
 * const counting: Transport = {
 *   read: (buffer) => socket.read(buffer),
 *   write: async (data) => (written += await socket.write(data), data.length),
 *   close: () => socket.close(),
 * };
 * const conn = new Conn(counting, { role: "server" });
 * await conn.writeMessage(MESSAGE_TYPE.Text, "hi");
 * await conn.writeControl(MESSAGE_TYPE.Ping);
 * assert.equal(written, 6);
 * conn.close();
 * peer.close();
 * ```
 */
export interface Transport {
  /** Reads into `buffer`; resolves the count, or `null` at EOF. */
  read(buffer: Uint8Array): Promise<number | null>;
  /** Writes from `data`; may write fewer bytes than given. */
  write(data: Uint8Array): Promise<number>;
  /** Closes the stream; pending reads and writes reject. */
  close(): void;
  /** The local address, when the transport has one. */
  readonly localAddr?: Deno.Addr;
  /** The remote address, when the transport has one. */
  readonly remoteAddr?: Deno.Addr;
}

/**
 * A pool of write buffers shared by many connections, so that idle
 * connections hold none (gorilla's `WriteBufferPool`).
 *
 * @example A simple shared pool
 * ```ts title="Sharing write buffers"
 * import { type BufferPool, Conn, MESSAGE_TYPE } from "./conn.ts";
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

/**
 * Options of the {@linkcode Conn} constructor.
 *
 * @example A client with bigger buffers
 * ```ts title="Connection options"
 * import { Conn, type ConnOptions } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const options: ConnOptions = {
 *   role: "client",
 *   subprotocol: "chat",
 *   readBufferSize: 16384,
 *   writeBufferSize: 16384,
 * };
 * const conn = new Conn(peer, options);
 * assert.equal(conn.subprotocol, "chat");
 * conn.close();
 * socket.close();
 * ```
 */
export interface ConnOptions {
  /**
   * `"server"` requires masked frames from the peer and sends unmasked
   * ones; `"client"` masks every frame with a crypto-random key and rejects
   * masked frames (RFC 6455 section 5.1).
   */
  role: "server" | "client";
  /** The subprotocol negotiated in the handshake (default `""`). */
  subprotocol?: string;
  /** Bytes already read past the handshake; they are parsed first. */
  head?: Uint8Array;
  /** Size of the read buffer while messages flow (default 4096). */
  readBufferSize?: number;
  /** Size of the write buffer frames are coalesced into (default 4096). */
  writeBufferSize?: number;
  /** Where write buffers come from and go back to (default: own buffer). */
  writeBufferPool?: BufferPool;
  /**
   * The permessage-deflate parameters negotiated in the handshake (RFC 7692,
   * see `negotiateDeflate` and `acceptDeflateResponse` in deflate.ts); absent
   * when the extension is not in use. Frames with RSV1 set are refused (1002)
   * without it.
   */
  compression?: DeflateParameters;
  /**
   * Data messages shorter than this many bytes are sent uncompressed even
   * when compression is on (default 256): below a few hundred bytes, setting
   * up a compressor costs more than the bytes it saves.
   */
  compressionThreshold?: number;
}

/** A data message read from a {@linkcode Conn}. */
export interface Message {
  /** {@linkcode MESSAGE_TYPE.Text} or {@linkcode MESSAGE_TYPE.Binary}. */
  type: DataMessageType;
  /**
   * The payload; for text, valid UTF-8. A small message may be a view into
   * the buffer it was read into (`data.buffer` is then larger than the
   * message); its bytes are never overwritten.
   */
  data: Uint8Array;
}

/** Options of the read methods of {@linkcode Conn}. */
export interface ReadOptions {
  /**
   * Aborts the wait. As with a read deadline, an aborted read leaves the
   * read side failed: every later read rejects with the same reason.
   */
  signal?: AbortSignal;
}

/** Streams the payload of one message, as {@linkcode Conn.nextReader} gives it. */
export interface MessageReader {
  /**
   * Reads the next bytes of the message into `buffer`.
   *
   * @returns The number of bytes read, or `null` when the message is done.
   */
  read(buffer: Uint8Array): Promise<number | null>;
}

/** A message being read as a stream: its type and its reader. */
export interface NextReaderResult {
  /** The message type. */
  type: DataMessageType;
  /** The reader of its payload. */
  reader: MessageReader;
}

/** Streams one message out as fragments, as {@linkcode Conn.nextWriter} gives it. */
export interface MessageWriter extends AsyncDisposable {
  /** Appends bytes (or the UTF-8 of a string) to the message. */
  write(data: Uint8Array | string): Promise<void>;
  /** Sends the final fragment; the message is complete. */
  close(): Promise<void>;
}

/** Options of {@linkcode Conn.writeMessage}. */
export interface WriteOptions {
  /**
   * Aborts the wait for room in the queue or for the socket. The frame may
   * already be queued, so an aborted write leaves the write side failed:
   * every later write rejects with the same reason.
   */
  signal?: AbortSignal;
}

/** Options of {@linkcode Conn.writeControl}. */
export interface WriteControlOptions {
  /** Gives up (and fails the write side) when the frame is not sent by then. */
  deadline?: Date;
}

/** Options of {@linkcode Conn.closeGracefully}. */
export interface CloseGracefullyOptions {
  /** Milliseconds to wait for the peer's close frame (default 5000). */
  timeout?: number;
  /**
   * When the application has read a message and not yet come back for the
   * next one, hold the close frame until it does (its answer goes out
   * first), within `timeout`. For closing from outside the application's
   * read loop, as a server shutdown does; never set it when calling from
   * inside the loop, which would wait for itself. Default false.
   */
  afterCurrentMessage?: boolean;
}

/** Called with the code and reason of a received close frame. */
export type CloseHandler = (
  code: number,
  text: string,
) => void | Promise<void>;

/** Called with the payload of a received ping or pong frame. */
export type ControlHandler = (data: Uint8Array) => void | Promise<void>;

/**
 * The peer sent a close frame (or the connection died: code 1006,
 * abnormal closure, which never appears on the wire).
 *
 * @example Recognise a close
 * ```ts title="A CloseError carries the code and reason"
 * import { CloseError, isCloseError } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * const error = new CloseError(1001, "going away");
 * assert.equal(error.code, 1001);
 * assert.equal(error.text, "going away");
 * assert.equal(isCloseError(error, 1000, 1001), true);
 * ```
 */
export class CloseError extends Error {
  /** The close code. */
  readonly code: number;
  /** The close reason. */
  readonly text: string;

  /**
   * Creates a close error.
   *
   * @param code The close code.
   * @param text The close reason.
   * @param options The error's `cause`.
   */
  constructor(code: number, text = "", options?: ErrorOptions) {
    super(`Connection closed: ${code}${text ? ` ${text}` : ""}`, options);
    this.name = "CloseError";
    this.code = code;
    this.text = text;
  }
}

/**
 * A data or close frame was written after a close frame was already sent
 * (gorilla's `ErrCloseSent`).
 *
 * @example Writing after closing
 * ```ts title="Writes after a close frame reject"
 * import { CloseSentError, Conn, MESSAGE_TYPE } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const conn = new Conn(socket, { role: "server" });
 * await conn.writeControl(MESSAGE_TYPE.Close, new Uint8Array([3, 232]));
 * await assert.rejects(conn.writeMessage(MESSAGE_TYPE.Text, "late"), CloseSentError);
 * conn.close();
 * peer.close();
 * ```
 */
export class CloseSentError extends Error {
  /**
   * Creates the error.
   *
   * @param message What was attempted.
   */
  constructor(message = "Cannot write: a close frame was already sent") {
    super(message);
    this.name = "CloseSentError";
  }
}

/**
 * A message exceeded the read limit; the connection was failed with close
 * code 1009 (gorilla's `ErrReadLimit`). For a compressed message the limit
 * bounds its inflated size.
 *
 * @example The error carries code 1009
 * ```ts title="A read limit error"
 * import { ReadLimitError } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * const error = new ReadLimitError(10);
 * assert.equal(error.code, 1009);
 * assert.equal(error.limit, 10);
 * ```
 */
export class ReadLimitError extends ProtocolError {
  /** The limit that was exceeded, in bytes. */
  readonly limit: number;

  /**
   * Creates the error.
   *
   * @param limit The read limit in bytes.
   * @param options The underlying cause, if any.
   */
  constructor(limit: number, options?: ErrorOptions) {
    super(
      `Cannot read message: it exceeds the read limit of ${limit} bytes`,
      CLOSE_CODE.MessageTooBig,
      options,
    );
    this.name = "ReadLimitError";
    this.limit = limit;
  }
}

/**
 * The connection was closed locally with {@linkcode Conn.close} while a read
 * or write was pending, or used after it.
 *
 * @example Reading after close()
 * ```ts title="Reads after close() reject"
 * import { Conn, ConnectionClosedError } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const conn = new Conn(socket, { role: "server" });
 * conn.close();
 * await assert.rejects(conn.readMessage(), ConnectionClosedError);
 * peer.close();
 * ```
 */
export class ConnectionClosedError extends Error {
  /**
   * Creates the error.
   *
   * @param message What was attempted.
   * @param options The error's `cause`.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConnectionClosedError";
  }
}

/**
 * Whether `error` is a {@linkcode CloseError} with one of `codes` (any code
 * when none are given, where gorilla's `IsCloseError` would say false).
 *
 * @param error Anything caught.
 * @param codes Close codes to accept.
 * @returns True for a matching close error.
 *
 * @example Checking for a normal closure
 * ```ts title="isCloseError"
 * import { CloseError, isCloseError } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isCloseError(new CloseError(1000), 1000, 1001), true);
 * assert.equal(isCloseError(new Error("boom")), false);
 * ```
 */
export function isCloseError(error: unknown, ...codes: number[]): boolean {
  return error instanceof CloseError &&
    (codes.length === 0 || codes.includes(error.code));
}

/**
 * Whether `error` is a {@linkcode CloseError} whose code is not one of
 * `expectedCodes`.
 *
 * @param error Anything caught.
 * @param expectedCodes Close codes that are expected.
 * @returns True for a close error with another code.
 *
 * @example Spotting an abnormal closure
 * ```ts title="isUnexpectedCloseError"
 * import { CloseError, isUnexpectedCloseError } from "./conn.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isUnexpectedCloseError(new CloseError(1006), 1000, 1001), true);
 * assert.equal(isUnexpectedCloseError(new CloseError(1001), 1000, 1001), false);
 * ```
 */
export function isUnexpectedCloseError(
  error: unknown,
  ...expectedCodes: number[]
): boolean {
  return error instanceof CloseError && !expectedCodes.includes(error.code);
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
const RESOLVED: Promise<void> = Promise.resolve();
const noop = () => {};

/** gorilla's default buffer sizes. */
const DEFAULT_BUFFER_SIZE = 4096;
/**
 * Read buffer of an idle connection: its pending read holds only this much
 * (issue 7, S6), and it grows to `readBufferSize` once a read fills it.
 */
const IDLE_READ_SIZE = 512;
/** A lent read buffer is read on into only while this much is free. */
const MIN_TAIL = 128;
/** Largest frame that must fit the read buffer at once: a control frame. */
const MAX_CONTROL_FRAME = 14 + MAX_CONTROL_PAYLOAD;
/**
 * Bytes queued for the socket beyond which a write waits until its frame is
 * written (backpressure); below it a write resolves once queued, so a
 * sequential echo loop still coalesces.
 */
const HIGH_WATER = 16 * 1024;
/** Bytes queued beyond which further messages wait before being queued. */
const QUEUE_LIMIT = 4 * HIGH_WATER;
/** Payloads from this size are written as their own write, not copied. */
const COPY_LIMIT = 4096;
/** Largest piece a message payload is allocated in before it arrives. */
const MAX_CHUNK = 16 * 1024 * 1024;
/** First piece of a message payload allocated before its bytes arrive. */
const FIRST_CHUNK = 64 * 1024;
/**
 * Most compressed bytes gathered for one inflate call when a frame is not
 * buffered whole (the inflater slices them by the read limit anyway).
 */
const INFLATE_PIECE = 64 * 1024;
/** How long a failed connection waits for its close frame to be written. */
const FAIL_CLOSE_TIMEOUT = 1000;
/**
 * Free bytes in front of a large message's payload: a server's frame header
 * (at most 10 bytes, unmasked) fits there, so echoing the message writes
 * header and payload as one piece (see #append).
 */
const FRAME_HEADROOM = 10;
/**
 * Buffers of payloads returned with FRAME_HEADROOM free bytes in front. An
 * entry is used up by the first write of its payload: a second write, even
 * of another type on another connection, cannot overwrite a header still
 * queued.
 */
const headroomBuffers = new WeakSet<ArrayBufferLike>();
/** Validates text messages that arrive whole (see #tryWholeMessage). */
const wholeMessageUtf8 = new Utf8Validator();
/**
 * Write buffers whose frames are written, shared by every connection without
 * a `writeBufferPool` and keyed by size: an idle connection then holds no
 * write buffer at all (issue 7, S6), while busy ones still reuse theirs.
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

function toBytes(data: Uint8Array | string, action: string): Uint8Array {
  if (typeof data === "string") return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  throw new TypeError(
    `Cannot ${action}: data must be a Uint8Array or a string`,
  );
}

function isDataType(type: number): type is DataMessageType {
  return type === MESSAGE_TYPE.Text || type === MESSAGE_TYPE.Binary;
}

function isControlType(type: number): boolean {
  return type === MESSAGE_TYPE.Close || type === MESSAGE_TYPE.Ping ||
    type === MESSAGE_TYPE.Pong;
}

/** Truncates a close reason to 123 bytes without splitting a character. */
function closeReason(text: string): string {
  let reason = text;
  while (encoder.encode(reason).length > MAX_CONTROL_PAYLOAD - 2) {
    reason = reason.slice(0, -1);
  }
  return reason;
}

/**
 * The one header object every connection parses into. It is only read
 * synchronously after a parse (never across an await), so sharing it keeps
 * a per-connection object and key array off every idle connection.
 */
const header: FrameHeader = {
  fin: false,
  rsv1: false,
  rsv2: false,
  rsv3: false,
  opcode: 0,
  masked: false,
  length: 0,
  maskKey: new Uint8Array(4),
  headerLength: 0,
};

/** The read view of a connection with nothing buffered. */
const EMPTY = new Uint8Array(0);

/**
 * A message encoded once and written to many connections
 * (gorilla's `PreparedMessage`): the frame is built once per role.
 *
 * @example Broadcast one message
 * ```ts title="Writing a prepared message"
 * import { Conn, MESSAGE_TYPE, PreparedMessage } from "./conn.ts";
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

/** The RSV1 bit of a frame's first byte: a compressed message (RFC 7692). */
const RSV1 = 0x40;

/**
 * Compressed payloads of prepared messages, made on first use by a
 * connection that compresses: with no context takeover a message compresses
 * the same on every connection, as gorilla's prepared frames do.
 */
const compressedPayloads = new WeakMap<
  PreparedMessage,
  Promise<Uint8Array | undefined>
>();

function compressedPayloadOf(
  message: PreparedMessage,
): Promise<Uint8Array | undefined> {
  let compressed = compressedPayloads.get(message);
  if (compressed === undefined) {
    // compressMessage() never rejects: a failure resolves to undefined.
    compressed = compressMessage(message.data);
    compressedPayloads.set(message, compressed);
  }
  return compressed;
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

/** A place in the order of data messages: `ready` when it is due. */
interface Lock {
  ready: Promise<void>;
  release: () => void;
}

/** What a fragment writer needs from its connection. */
interface WriterSink {
  append(b0: number, payload: Uint8Array): Promise<void>;
  room(): Promise<void>;
  blocked(action: string): unknown;
  /** Fails the connection (sends the error's close code, then closes). */
  fail(error: ProtocolError): void;
  fragmentSize: number;
}

/**
 * A WebSocket connection: reads and writes messages over a
 * {@linkcode Transport}. One reader at a time, as in gorilla; writes are safe
 * from overlapping async callers (frames never interleave on the wire).
 *
 * @example Read messages with for await
 * ```ts title="Iterating over messages"
 * import { Conn, MESSAGE_TYPE } from "./conn.ts";
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
 * await client.writeMessage(MESSAGE_TYPE.Text, "a");
 * await client.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array([1]));
 * const closing = client.closeGracefully();
 * const types = [];
 * for await (const message of server) types.push(message.type);
 * assert.deepEqual(types, [MESSAGE_TYPE.Text, MESSAGE_TYPE.Binary]);
 * await closing;
 * server.close();
 * ```
 */
export class Conn implements AsyncIterable<Message>, AsyncDisposable {
  #transport: Transport;
  #client: boolean;
  #subprotocol: string;
  #closed = false;

  // ---- read state ----
  #readBufferSize: number;
  #rbuf: Uint8Array;
  #rpos = 0;
  #rend = 0;
  /** `#rbuf` up to `#rend`: what frame headers are parsed from. */
  #rview: Uint8Array;
  /** Messages were handed out as views of `#rbuf` (see #prepareFill). */
  #lent = false;
  /** Whether reads use the full read buffer (data is flowing). */
  #bigReads = false;
  /** Payload bytes of the current data frame not yet consumed. */
  #remaining = 0;
  #frameFin = true;
  #frameMasked = false;
  /** Masking key of the current data frame (a server's only). */
  #frameKey: Uint8Array | undefined;
  #maskPos = 0;
  /** A fragmented message is open: the next data frame must continue it. */
  #messageOpen = false;
  /** The current message has unconsumed payload (or frames) left. */
  #messagePending = false;
  #messageType: DataMessageType = MESSAGE_TYPE.Binary;
  #messageLength = 0;
  #validating = false;
  #utf8: Utf8Validator | undefined;
  #readLimit = 0;
  /** Made on first use: a Conn that never sets one pays nothing for it. */
  #readDeadline: Deadline | undefined;
  #reading = false;
  #readSignal: AbortSignal | undefined;
  #readErr: unknown;
  #readIdle: (() => void)[] = [];
  /** Waiting for the application to start its next read. */
  #readBegun: (() => void)[] = [];
  /** The application read a message and has not started the next read. */
  #handling = false;
  #draining: Promise<void> | undefined;
  #closeReceived = false;
  /** Counts messages begun, so a stale streaming reader can tell. */
  #messageSeq = 0;

  // ---- write state ----
  #writeBufferSize: number;
  #pool: BufferPool | undefined;
  /** The buffer small frames are being coalesced into. */
  #wbuf: Uint8Array | undefined;
  #wstart = 0;
  #wlen = 0;
  /** Completed pieces of the batch being assembled, in order. */
  #segments: Uint8Array[] = [];
  /** Write buffers used by the batch being assembled. */
  #batchBuffers: Uint8Array[] = [];
  #batch: Batch | undefined;
  #inFlight: Batch | undefined;
  /** Bytes queued or in flight. */
  #queued = 0;
  #roomWaiters: (() => void)[] = [];
  /** Made on first use, like the read deadline. */
  #writeDeadline: Deadline | undefined;
  #writeErr: unknown;
  #closeSent = false;
  #lockTail: Promise<void> = RESOLVED;
  #lockCount = 0;
  #compressWrites = true;
  #writerSink: WriterSink | undefined;

  // ---- permessage-deflate (RFC 7692) ----
  #compression: DeflateParameters | undefined;
  /** Data messages may go out compressed (negotiated, our window allowed). */
  #deflate = false;
  #compressionThreshold = DEFAULT_COMPRESSION_THRESHOLD;
  /** Created with the first compressed message received. */
  #inflaterSlot: InflaterSlot | undefined;
  /** The current message arrived with RSV1 set. */
  #messageCompressed = false;
  /** The current compressed message's last piece has been inflated. */
  #inflateDone = false;
  /** Inflated bytes a streaming reader has not taken yet, and its offset. */
  #inflated: Uint8Array[] | undefined;
  #inflatedPos = 0;
  /** A client's masking key, refilled for every frame. */
  #maskKey: Uint8Array | undefined;
  /** The reader is working through buffered frames (see #cork). */
  #burst = false;
  #uncorkTimer: ReturnType<typeof setTimeout> | undefined;

  // ---- handlers ----
  // Handlers; undefined means gorilla's default, which lives on the
  // prototype so that connections do not each hold closures for it.
  #closeHandler: CloseHandler | undefined;
  #pingHandler: ControlHandler | undefined;
  #pongHandler: ControlHandler | undefined;

  /**
   * Wraps a transport on which the opening handshake is complete.
   *
   * @param transport The byte stream (e.g. a `Deno.Conn`).
   * @param options The role and buffer settings.
   * @throws {TypeError} The role is neither `"server"` nor `"client"`, or
   * `compression` is not an object.
   * @throws {RangeError} A buffer size is not a positive integer, or the
   * compression threshold is not a non-negative integer.
   */
  constructor(transport: Transport, options: ConnOptions) {
    if (options?.role !== "server" && options?.role !== "client") {
      throw new TypeError(
        `Cannot create connection: role must be "server" or "client", got ${options?.role}`,
      );
    }
    const readBufferSize = options.readBufferSize ?? DEFAULT_BUFFER_SIZE;
    const writeBufferSize = options.writeBufferSize ?? DEFAULT_BUFFER_SIZE;
    for (
      const [name, value] of [
        ["readBufferSize", readBufferSize],
        ["writeBufferSize", writeBufferSize],
      ] as const
    ) {
      if (!Number.isInteger(value) || value <= 0) {
        throw new RangeError(
          `Cannot create connection: ${name} must be a positive integer, got ${value}`,
        );
      }
    }
    const threshold = options.compressionThreshold ??
      DEFAULT_COMPRESSION_THRESHOLD;
    if (!Number.isSafeInteger(threshold) || threshold < 0) {
      throw new RangeError(
        `Cannot create connection: compressionThreshold must be a non-negative integer, got ${threshold}`,
      );
    }
    const compression = options.compression;
    if (
      compression !== undefined &&
      (typeof compression !== "object" || compression === null)
    ) {
      throw new TypeError(
        "Cannot create connection: compression must be the negotiated DeflateParameters",
      );
    }
    this.#transport = transport;
    // Frames are coalesced here, so Nagle's algorithm only adds delay to
    // the small frames that remain (40 ms stalls behind delayed ACKs). Go,
    // and so gorilla, sets TCP_NODELAY on every TCP connection by default.
    (transport as { setNoDelay?: (noDelay: boolean) => void }).setNoDelay?.(
      true,
    );
    this.#client = options.role === "client";
    this.#subprotocol = options.subprotocol ?? "";
    this.#compression = compression;
    this.#deflate = compression !== undefined &&
      canCompress(compression, options.role);
    this.#compressionThreshold = threshold;
    this.#readBufferSize = Math.max(readBufferSize, MAX_CONTROL_FRAME);
    this.#writeBufferSize = Math.max(writeBufferSize, MAX_CONTROL_FRAME);
    this.#pool = options.writeBufferPool;
    const head = options.head;
    if (head !== undefined && head.length > 0) {
      this.#rbuf = new Uint8Array(Math.max(head.length, IDLE_READ_SIZE));
      this.#rbuf.set(head);
      this.#rend = head.length;
    } else {
      this.#rbuf = new Uint8Array(
        Math.min(IDLE_READ_SIZE, this.#readBufferSize),
      );
    }
    this.#rview = this.#rbuf.subarray(0, this.#rend);
  }

  /** The subprotocol negotiated in the handshake, `""` when none. */
  get subprotocol(): string {
    return this.#subprotocol;
  }

  /**
   * The permessage-deflate parameters negotiated for this connection (RFC
   * 7692), or undefined when messages are never compressed. Received
   * messages may be compressed whenever it is set; sent ones are compressed
   * unless {@linkcode Conn.enableWriteCompression} turned that off, the
   * message is below the compression threshold, or the peer limited our
   * window (`*_max_window_bits` below 15, which `CompressionStream` cannot
   * honour).
   *
   * @example Checking what the handshake agreed
   * ```ts title="compression"
   * import { Conn } from "./conn.ts";
   * import { DEFLATE_OFFER, negotiateDeflate } from "./deflate.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [socket, peer] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const compression = negotiateDeflate(DEFLATE_OFFER)?.parameters;
   * const conn = new Conn(socket, { role: "server", compression });
   * assert.equal(conn.compression?.serverNoContextTakeover, true);
   * assert.equal(new Conn(peer, { role: "client" }).compression, undefined);
   * conn.close();
   * peer.close();
   * ```
   */
  get compression(): DeflateParameters | undefined {
    return this.#compression;
  }

  /** The local address of the transport. */
  get localAddr(): Deno.Addr | undefined {
    return this.#transport.localAddr;
  }

  /** The remote address of the transport. */
  get remoteAddr(): Deno.Addr | undefined {
    return this.#transport.remoteAddr;
  }

  /** The underlying transport (gorilla's `NetConn`). */
  get transport(): Transport {
    return this.#transport;
  }

  /** Whether {@linkcode Conn.close} closed the transport. */
  get closed(): boolean {
    return this.#closed;
  }

  // =========================================================== reading

  /**
   * Reads the next data message whole. Control frames that arrive first
   * are handled on the way; the unread rest of a message begun with
   * {@linkcode Conn.nextReader} is discarded.
   *
   * @param options An abort signal.
   * @returns The message type and payload.
   * @throws {CloseError} The peer sent a close frame, or the connection
   * died (1006).
   * @throws {ProtocolError} The peer broke the protocol; a close frame with
   * `code` was sent and the transport closed.
   * @throws {ReadLimitError} The message exceeds the read limit (1009 sent).
   * @throws {Deno.errors.TimedOut} The read deadline passed.
   * @throws {TypeError} Another read is in progress.
   *
   * @example Read one message
   * ```ts title="readMessage"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await client.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array([1, 2]));
   * const message = await server.readMessage();
   * assert.equal(message.type, MESSAGE_TYPE.Binary);
   * assert.deepEqual([...message.data], [1, 2]);
   * client.close();
   * server.close();
   * ```
   */
  async readMessage(options?: ReadOptions): Promise<Message> {
    if (this.#draining !== undefined) await this.#draining;
    this.#beginRead("read message", options?.signal);
    try {
      while (!this.#messagePending) {
        const fast = this.#tryWholeMessage();
        if (fast !== undefined) {
          // More frames wait in the buffer: answers to them can share a write.
          this.#burst = this.#wholeFrameBuffered();
          this.#handling = true;
          return fast;
        }
        // An idle connection waits right here, so that all it holds while
        // idle is this one suspended call and its read (issue 7, S6).
        if (this.#rpos !== this.#rend) break;
        const space = this.#prepareFill(MAX_HEADER_LENGTH);
        let n: number | null;
        try {
          n = await this.#startRead(space);
        } catch (error) {
          throw this.#readError(error);
        }
        if (n === null) throw unexpectedEOF();
        this.#commitFill(space, n);
      }
      await this.#startMessage();
      const type = this.#messageType;
      // Payload is allocated as it arrives, in pieces that start at
      // FIRST_CHUNK and grow with what was received (up to MAX_CHUNK), so
      // a header that merely claims a huge length costs little until the
      // bytes really come. Under a read limit the application accepted
      // messages of that size, so a frame within it is allocated at once
      // (and a single-frame message is returned without a copy). Small
      // frames fill the free end of the last piece: a message of many tiny
      // fragments costs about its payload, not an object per fragment.
      const payload = new PayloadBuilder();
      const atOnce = Math.max(FIRST_CHUNK, this.#readLimit);
      // A compressed message is inflated as its payload arrives: neither its
      // compressed nor its inflated bytes are held beyond the read limit.
      while (this.#messageCompressed && !this.#inflateDone) {
        if (this.#remaining === 0 && !this.#frameFin) {
          await this.#nextDataFrame();
          continue;
        }
        for (const chunk of await this.#inflateNext()) payload.add(chunk);
      }
      // A large unfragmented message, the common case, skips the pieces:
      // one buffer of its size, with room for an echo's header in front.
      if (
        !this.#messageCompressed && this.#frameFin &&
        this.#remaining >= COPY_LIMIT && this.#remaining <= MAX_CHUNK
      ) {
        const data = await this.#readFramePayload();
        this.#messagePending = false;
        this.#handling = true;
        return { type, data };
      }
      while (!this.#messageCompressed) {
        while (this.#remaining > 0) {
          const total = payload.total;
          const space = payload.space(
            Math.min(
              Math.max(this.#remaining, total),
              Math.max(atOnce, total),
              MAX_CHUNK,
            ),
          );
          const n = Math.min(space.length, this.#remaining);
          await this.#readPayloadInto(space.subarray(0, n));
          payload.commit(n);
        }
        if (this.#frameFin) break;
        await this.#nextDataFrame();
      }
      this.#messagePending = false;
      this.#handling = true;
      return { type, data: payload.result() };
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
  }

  /**
   * Starts reading the next data message as a stream: resolves once its
   * first frame header arrived, and the reader yields payload bytes as they
   * are read. Starting another message discards the unread rest.
   *
   * @param options An abort signal for the wait for the first frame.
   * @returns The message type and a reader of its payload.
   * @throws {CloseError} The peer sent a close frame or the connection died.
   * @throws {ProtocolError} The peer broke the protocol.
   * @throws {TypeError} Another read is in progress.
   *
   * @example Stream a message
   * ```ts title="nextReader"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await client.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(10).fill(7));
   * const { type, reader } = await server.nextReader();
   * assert.equal(type, MESSAGE_TYPE.Binary);
   * const buffer = new Uint8Array(4);
   * let total = 0;
   * for (let n; (n = await reader.read(buffer)) !== null;) total += n;
   * assert.equal(total, 10);
   * client.close();
   * server.close();
   * ```
   */
  async nextReader(options?: ReadOptions): Promise<NextReaderResult> {
    if (this.#draining !== undefined) await this.#draining;
    this.#beginRead("start reader", options?.signal);
    try {
      await this.#startMessage();
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
    const seq = this.#messageSeq;
    return {
      type: this.#messageType,
      reader: { read: (buffer) => this.#readStream(seq, buffer) },
    };
  }

  /**
   * Reads the next message and parses it as JSON.
   *
   * @param options An abort signal.
   * @returns The parsed value.
   * @throws {SyntaxError} The message is not JSON.
   * @throws {CloseError} As {@linkcode Conn.readMessage}.
   *
   * @example Exchange JSON
   * ```ts title="readJSON"
   * import { Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await client.writeJSON({ n: 1 });
   * assert.deepEqual(await server.readJSON(), { n: 1 });
   * client.close();
   * server.close();
   * ```
   */
  async readJSON<T = unknown>(options?: ReadOptions): Promise<T> {
    const { data } = await this.readMessage(options);
    return JSON.parse(decoder.decode(data)) as T;
  }

  /**
   * Iterates over data messages until the peer closes with 1000, 1001 or no
   * status (1005); any other close or failure is thrown.
   *
   * @returns An async iterator of messages.
   */
  [Symbol.asyncIterator](): AsyncIterator<Message> {
    return new MessageIterator(this);
  }

  /**
   * Sets the largest message the peer may send, in bytes; 0 (the default)
   * means no limit. A larger message fails the connection with 1009. A
   * compressed message (permessage-deflate) is bounded by its inflated size,
   * checked while it is inflated, so a decompression bomb is refused after
   * about `limit` bytes.
   *
   * @param limit The limit in bytes.
   * @throws {RangeError} The limit is not a non-negative integer.
   *
   * @example Limit messages to 1 KiB
   * ```ts title="setReadLimit"
   * import { Conn } from "./conn.ts";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [socket, peer] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const conn = new Conn(socket, { role: "server" });
   * conn.setReadLimit(1024);
   * conn.close();
   * peer.close();
   * ```
   */
  setReadLimit(limit: number): void {
    if (!Number.isSafeInteger(limit) || limit < 0) {
      throw new RangeError(
        `Cannot set read limit: ${limit} is not a non-negative integer`,
      );
    }
    this.#readLimit = limit;
  }

  /**
   * Sets when pending and future reads give up (`null`: never). A read that
   * times out fails the read side for good with `Deno.errors.TimedOut`.
   * As in Go, moving the deadline also moves it for the read in flight
   * (setting it to now wakes a blocked reader), once this Conn has had a
   * read deadline or signal: until then reads run without a timer, so the
   * very first deadline bounds the reads that start after it.
   *
   * @param time The absolute deadline, or `null`.
   * @throws {TypeError} `time` is not a valid `Date` or `null`.
   *
   * @example A read that times out
   * ```ts title="setReadDeadline"
   * import { Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [socket, peer] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const conn = new Conn(socket, { role: "server" });
   * conn.setReadDeadline(new Date(Date.now() + 10));
   * await assert.rejects(conn.readMessage(), Deno.errors.TimedOut);
   * conn.close();
   * peer.close();
   * ```
   */
  setReadDeadline(time: Date | null): void {
    const at = deadlineOf(time, "set read deadline");
    if (at !== 0 || this.#readDeadline !== undefined) {
      (this.#readDeadline ??= new Deadline("read")).set(at);
    }
  }

  // =========================================================== writing

  /**
   * Writes a whole message. Data messages wait behind an open
   * {@linkcode Conn.nextWriter}; control types go to
   * {@linkcode Conn.writeControl}. Resolves once the frame is queued while
   * little is queued, otherwise once it is written (backpressure). With
   * permessage-deflate (see {@linkcode Conn.compression}) a data message of
   * at least the compression threshold is compressed first, in turn, so
   * messages keep their order.
   *
   * @param type The message type.
   * @param data The payload, or a string sent as its UTF-8.
   * @param options An abort signal for the wait.
   * @throws {TypeError} The type is not a message type or data is not bytes
   * or a string.
   * @throws {CloseSentError} A close frame was already sent.
   * @throws {Deno.errors.TimedOut} The write deadline passed.
   *
   * @example Write text and binary messages
   * ```ts title="writeMessage"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await server.writeMessage(MESSAGE_TYPE.Text, "hi");
   * assert.equal(new TextDecoder().decode((await client.readMessage()).data), "hi");
   * client.close();
   * server.close();
   * ```
   */
  writeMessage(
    type: MessageType,
    data: Uint8Array | string,
    options?: WriteOptions,
  ): Promise<void> {
    const signal = options?.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (!isDataType(type)) {
      if (isControlType(type)) return this.writeControl(type, data);
      return Promise.reject(
        new TypeError(`Cannot write message: ${type} is not a message type`),
      );
    }
    let bytes: Uint8Array;
    try {
      bytes = toBytes(data, "write message");
    } catch (error) {
      return Promise.reject(error);
    }
    const blocked = this.#writeBlocked("write message");
    if (blocked !== undefined) return Promise.reject(blocked);
    let written: Promise<void>;
    if (this.#compressing(bytes.length)) {
      // Compressed later, in turn: like a small frame copied into the write
      // buffer, a small payload is the caller's again once this returns.
      if (bytes === data && bytes.length < COPY_LIMIT) bytes = bytes.slice();
      written = this.#writeLocked(0x80 | type, bytes, true);
    } else if (this.#lockCount === 0 && this.#queued <= QUEUE_LIMIT) {
      written = this.#append(0x80 | type, bytes, false);
    } else {
      written = this.#writeLocked(0x80 | type, bytes);
    }
    return signal === undefined ? written : this.#bounded(written, 0, signal);
  }

  /**
   * Starts a message sent in fragments: each fragment is a frame of up to
   * `writeBufferSize` bytes, and `close()` sends the final one. Other data
   * messages, and a further `nextWriter()`, wait until the writer is closed
   * (gorilla closes the previous writer instead, which overlapping async
   * callers would turn into a cut message): a writer left open holds back
   * every later data message. Control frames may go between its fragments.
   *
   * With permessage-deflate, the message is compressed fragment by fragment
   * (RSV1 on the first); one that ends within its first fragment below the
   * compression threshold goes out uncompressed. Should the compressor's
   * output ever be malformed, the first fragment goes out uncompressed
   * instead, while a later one (RSV1 already sent) fails the connection
   * with 1011.
   *
   * @param type {@linkcode MESSAGE_TYPE.Text} or {@linkcode MESSAGE_TYPE.Binary}.
   * @returns The writer.
   * @throws {TypeError} The type is not a data message type.
   *
   * @example Stream a message in pieces
   * ```ts title="nextWriter"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * const writer = server.nextWriter(MESSAGE_TYPE.Text);
   * await writer.write("hello, ");
   * await writer.write("world");
   * await writer.close();
   * const { data } = await client.readMessage();
   * assert.equal(new TextDecoder().decode(data), "hello, world");
   * client.close();
   * server.close();
   * ```
   */
  nextWriter(type: DataMessageType): MessageWriter {
    if (!isDataType(type)) {
      throw new TypeError(
        `Cannot start writer: ${type} is not a data message type`,
      );
    }
    this.#writerSink ??= {
      append: (b0, payload) => this.#append(b0, payload, false),
      room: () => this.#room(),
      blocked: (action) => this.#writeBlocked(action),
      fail: (error) => this.#failConnection(error),
      fragmentSize: this.#writeBufferSize,
    };
    return new FragmentWriter(
      this.#writerSink,
      type,
      this.#acquireLock(),
      this.#deflate && this.#compressWrites ? this.#compressionThreshold : -1,
    );
  }

  /**
   * Writes a close, ping or pong frame (payload at most 125 bytes) and
   * resolves once it is written. It may go between fragments of a message.
   *
   * @param type {@linkcode MESSAGE_TYPE.Close}, `Ping` or `Pong`.
   * @param data The payload (for close, see {@linkcode formatCloseMessage}).
   * @param options A deadline for this frame.
   * @throws {TypeError} The type is not a control type.
   * @throws {RangeError} The payload exceeds 125 bytes.
   * @throws {CloseSentError} A close frame was already sent.
   * @throws {Deno.errors.TimedOut} The deadline passed.
   *
   * @example Send a ping
   * ```ts title="writeControl"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * const pong = Promise.withResolvers<string>();
   * client.setPongHandler((data) => pong.resolve(new TextDecoder().decode(data)));
   * // Control frames are handled by reads, so both sides keep reading.
   * const reads = [server.readMessage(), client.readMessage()]
   *   .map((read) => read.catch(() => {}));
   * await client.writeControl(MESSAGE_TYPE.Ping, "p", {
   *   deadline: new Date(Date.now() + 1000),
   * });
   * assert.equal(await pong.promise, "p");
   * client.close();
   * server.close();
   * await Promise.all(reads);
   * ```
   */
  writeControl(
    type: MessageType,
    data: Uint8Array | string = new Uint8Array(0),
    options?: WriteControlOptions,
  ): Promise<void> {
    if (!isControlType(type)) {
      return Promise.reject(
        new TypeError(
          `Cannot write control frame: ${type} is not a control type`,
        ),
      );
    }
    let bytes: Uint8Array;
    try {
      bytes = toBytes(data, "write control frame");
    } catch (error) {
      return Promise.reject(error);
    }
    if (bytes.length > MAX_CONTROL_PAYLOAD) {
      return Promise.reject(
        new RangeError(
          `Cannot write control frame: the payload is ${bytes.length} bytes, over 125`,
        ),
      );
    }
    let deadline = 0;
    if (options?.deadline !== undefined) {
      try {
        deadline = deadlineOf(options.deadline, "write control frame");
      } catch (error) {
        return Promise.reject(error);
      }
    }
    const blocked = this.#writeBlocked("write control frame");
    if (blocked !== undefined) return Promise.reject(blocked);
    if (type === MESSAGE_TYPE.Close) this.#closeSent = true;
    const written = this.#append(0x80 | type, bytes, true);
    if (type === MESSAGE_TYPE.Close && this.#closeReceived) {
      this.#closeAfterFlush();
    }
    if (deadline === 0) return written;
    return this.#bounded(written, deadline, undefined);
  }

  /**
   * Writes `value` as a JSON text message.
   *
   * @param value Anything `JSON.stringify` accepts.
   * @throws {TypeError} The value does not serialise to JSON.
   *
   * @example Send JSON
   * ```ts title="writeJSON"
   * import { Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await server.writeJSON([1, "two"]);
   * assert.deepEqual(await client.readJSON(), [1, "two"]);
   * client.close();
   * server.close();
   * ```
   */
  writeJSON(value: unknown): Promise<void> {
    let text: string | undefined;
    try {
      text = JSON.stringify(value);
    } catch (error) {
      return Promise.reject(error);
    }
    if (text === undefined) {
      return Promise.reject(
        new TypeError(
          "Cannot write JSON: the value does not serialise to JSON",
        ),
      );
    }
    return this.writeMessage(MESSAGE_TYPE.Text, text);
  }

  /**
   * Writes a {@linkcode PreparedMessage}; a server reuses its encoded frame.
   *
   * @param message The prepared message.
   * @throws {CloseSentError} A close frame was already sent.
   *
   * @example See {@linkcode PreparedMessage}
   * ```ts title="writePreparedMessage"
   * import { Conn, MESSAGE_TYPE, PreparedMessage } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * await client.writePreparedMessage(new PreparedMessage(MESSAGE_TYPE.Binary, new Uint8Array([9])));
   * assert.deepEqual([...(await server.readMessage()).data], [9]);
   * client.close();
   * server.close();
   * ```
   */
  writePreparedMessage(message: PreparedMessage): Promise<void> {
    if (!(message instanceof PreparedMessage)) {
      return Promise.reject(
        new TypeError("Cannot write prepared message: not a PreparedMessage"),
      );
    }
    if (isDataType(message.type) && this.#compressing(message.data.length)) {
      const blocked = this.#writeBlocked("write prepared message");
      if (blocked !== undefined) return Promise.reject(blocked);
      return this.#writeLocked(0x80 | message.type, message.data, message);
    }
    if (this.#client || !isDataType(message.type)) {
      return this.writeMessage(message.type, message.data);
    }
    const blocked = this.#writeBlocked("write prepared message");
    if (blocked !== undefined) return Promise.reject(blocked);
    if (this.#lockCount === 0 && this.#queued <= QUEUE_LIMIT) {
      return this.#appendRaw(serverFrameOf(message));
    }
    return this.#writeLocked(0x80 | message.type, message.data);
  }

  /**
   * Sets when pending and future writes give up (`null`: never). A write
   * that times out fails the write side for good with
   * `Deno.errors.TimedOut`. As with {@linkcode Conn.setReadDeadline},
   * moving it applies to the socket write in flight once this Conn has had
   * a write deadline.
   *
   * @param time The absolute deadline, or `null`.
   * @throws {TypeError} `time` is not a valid `Date` or `null`.
   *
   * @example Bound every write by one second
   * ```ts title="setWriteDeadline"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [socket, peer] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const conn = new Conn(socket, { role: "server" });
   * conn.setWriteDeadline(new Date(Date.now() + 1000));
   * await conn.writeMessage(MESSAGE_TYPE.Text, "in time");
   * conn.setWriteDeadline(null);
   * conn.close();
   * peer.close();
   * ```
   */
  setWriteDeadline(time: Date | null): void {
    const at = deadlineOf(time, "set write deadline");
    if (at !== 0 || this.#writeDeadline !== undefined) {
      (this.#writeDeadline ??= new Deadline("write")).set(at);
    }
  }

  /**
   * Turns compression of written data messages on or off (on by default).
   * It applies to messages written from now on, so it may be toggled per
   * message: RFC 7692 lets every message choose. Without a negotiated
   * permessage-deflate extension (see {@linkcode Conn.compression}) messages
   * are never compressed. There is no compression level: the web-standard
   * `CompressionStream` offers none.
   *
   * @param enable Whether to compress messages written from now on.
   * @throws {TypeError} `enable` is not a boolean.
   *
   * @example Sending one message uncompressed
   * ```ts title="enableWriteCompression"
   * import { Conn, MESSAGE_TYPE } from "./conn.ts";
   * import { DEFLATE_OFFER, negotiateDeflate } from "./deflate.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const compression = negotiateDeflate(DEFLATE_OFFER)?.parameters;
   * const server = new Conn(serverSocket, { role: "server", compression });
   * const client = new Conn(clientSocket, { role: "client", compression });
   * const text = "compressible ".repeat(100);
   * server.enableWriteCompression(false);
   * await server.writeMessage(MESSAGE_TYPE.Text, text);
   * server.enableWriteCompression(true);
   * await server.writeMessage(MESSAGE_TYPE.Text, text);
   * for (let i = 0; i < 2; i++) {
   *   const { data } = await client.readMessage();
   *   assert.equal(new TextDecoder().decode(data), text);
   * }
   * assert.equal(server.writeCompression, true);
   * await Promise.all([client.closeGracefully(), server.closeGracefully()]);
   * ```
   */
  enableWriteCompression(enable: boolean): void {
    if (typeof enable !== "boolean") {
      throw new TypeError(
        `Cannot enable write compression: expected a boolean, got ${typeof enable}`,
      );
    }
    this.#compressWrites = enable;
  }

  /** Whether written messages are compressed when the extension is on. */
  get writeCompression(): boolean {
    return this.#compressWrites;
  }

  /** Whether a data message of `length` bytes goes out compressed. */
  #compressing(length: number): boolean {
    return this.#deflate && this.#compressWrites &&
      length >= this.#compressionThreshold;
  }

  // ========================================================== handlers

  /**
   * Sets the function called when a close frame arrives; `null` restores
   * the default, which echoes the close code back (RFC 6455 section 5.5.1).
   * The read that received it then rejects with a {@linkcode CloseError}.
   *
   * @param handler The handler, or `null`.
   *
   * @example Record the close code
   * ```ts title="setCloseHandler"
   * import { Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * let received = 0;
   * server.setCloseHandler((code) => { received = code; });
   * const closing = client.closeGracefully(4000, "done", { timeout: 200 });
   * await server.readMessage().catch(() => {});
   * assert.equal(received, 4000);
   * server.close();
   * await closing;
   * ```
   */
  setCloseHandler(handler: CloseHandler | null): void {
    this.#closeHandler = handler ?? undefined;
  }

  /**
   * Returns the current close handler.
   *
   * @returns The close handler.
   */
  closeHandler(): CloseHandler {
    return this.#closeHandler ??
      ((code: number) => this.#defaultCloseHandler(code));
  }

  /**
   * Sets the function called when a ping arrives; `null` restores the
   * default, which answers with a pong carrying the same payload.
   *
   * @param handler The handler, or `null`.
   */
  setPingHandler(handler: ControlHandler | null): void {
    this.#pingHandler = handler ?? undefined;
  }

  /**
   * Returns the current ping handler.
   *
   * @returns The ping handler.
   */
  pingHandler(): ControlHandler {
    return this.#pingHandler ??
      ((data: Uint8Array) => this.#defaultPingHandler(data));
  }

  /**
   * Sets the function called when a pong arrives; `null` restores the
   * default, which ignores it.
   *
   * @param handler The handler, or `null`.
   */
  setPongHandler(handler: ControlHandler | null): void {
    this.#pongHandler = handler ?? undefined;
  }

  /**
   * Returns the current pong handler.
   *
   * @returns The pong handler.
   */
  pongHandler(): ControlHandler {
    return this.#pongHandler ?? noop;
  }

  /** gorilla's default: echo the close code with no reason. */
  #defaultCloseHandler(code: number): Promise<void> | undefined {
    if (this.#closeSent || this.#writeErr !== undefined) return;
    return this.writeControl(MESSAGE_TYPE.Close, formatCloseMessage(code))
      .catch(noop);
  }

  /** gorilla's default: answer with a pong carrying the same payload. */
  #defaultPingHandler(data: Uint8Array): Promise<void> | undefined {
    if (this.#closeSent || this.#writeErr !== undefined) return;
    return this.writeControl(MESSAGE_TYPE.Pong, data).catch(noop);
  }

  // =========================================================== closing

  /**
   * Closes the transport at once, without a closing handshake (gorilla's
   * `Close`). Pending reads and writes reject. Calling it again does nothing.
   *
   * @example Close immediately
   * ```ts title="close"
   * import { Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [socket, peer] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const conn = new Conn(socket, { role: "server" });
   * conn.close();
   * assert.equal(conn.closed, true);
   * peer.close();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const error = new ConnectionClosedError(
      "Cannot use connection: it was closed",
    );
    this.#readErr ??= error;
    this.#writeErr ??= error;
    try {
      this.#transport.close();
    } catch {
      // Already closed by its owner: nothing left to release.
    }
    if (this.#uncorkTimer !== undefined) {
      clearTimeout(this.#uncorkTimer);
      this.#uncorkTimer = undefined;
    }
    this.#inflaterSlot?.release();
    this.#rejectQueued(this.#writeErr);
    this.#wakeRoom();
    wakeAll(this.#readBegun);
  }

  /**
   * Closes with the closing handshake (RFC 6455 section 7.1.2): sends a
   * close frame, waits for the peer's close frame up to `timeout`, then
   * closes the transport. It works whether or not the application is
   * reading; when it is not, data messages that arrive meanwhile are
   * discarded. Never rejects.
   *
   * @param code The close code (default 1000).
   * @param reason The close reason (default empty).
   * @param options How long to wait for the peer.
   * @throws {RangeError} The code cannot be sent or the reason is over 123
   * bytes (thrown synchronously; nothing is sent).
   *
   * @example Close politely
   * ```ts title="closeGracefully"
   * import { CloseError, Conn } from "./conn.ts";
   * import assert from "node:assert/strict";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const server = new Conn(serverSocket, { role: "server" });
   * const client = new Conn(clientSocket, { role: "client" });
   * const reading = server.readMessage().catch((error) => error);
   * await client.closeGracefully(1001, "bye", { timeout: 1000 });
   * const error = await reading;
   * assert.ok(error instanceof CloseError);
   * assert.equal(error.code, 1001);
   * server.close();
   * ```
   */
  closeGracefully(
    code: number = CLOSE_CODE.NormalClosure,
    reason = "",
    options?: CloseGracefullyOptions,
  ): Promise<void> {
    // RFC 6455 section 7.4: 1005, 1006 and 1015 are never sent; 1005 here
    // means "no status", an empty close frame.
    if (code !== CLOSE_CODE.NoStatusReceived && !isValidCloseCode(code)) {
      throw new RangeError(
        `Cannot close gracefully: close code ${code} may not be sent`,
      );
    }
    const payload = formatCloseMessage(code, reason);
    const timeout = options?.timeout ?? 5000;
    if (!Number.isFinite(timeout) || timeout < 0) {
      throw new RangeError(
        `Cannot close gracefully: timeout ${timeout} is not a non-negative number`,
      );
    }
    if (this.#closed) return RESOLVED;
    return this.#closeGracefully(
      payload,
      timeout,
      options?.afterCurrentMessage ?? false,
    );
  }

  async #closeGracefully(
    payload: Uint8Array,
    timeout: number,
    afterCurrentMessage: boolean,
  ): Promise<void> {
    const timer = setTimeout(() => this.close(), timeout);
    try {
      if (afterCurrentMessage && this.#handling && !this.#closed) {
        await new Promise<void>((resolve) => this.#readBegun.push(resolve));
      }
      if (!this.#closed && !this.#closeSent && this.#writeErr === undefined) {
        await this.writeControl(MESSAGE_TYPE.Close, payload).catch(noop);
      }
      while (!this.#closed && this.#readErr === undefined) {
        if (this.#reading) {
          await new Promise<void>((resolve) => this.#readIdle.push(resolve));
        } else {
          await this.#drain();
        }
      }
    } finally {
      clearTimeout(timer);
      this.close();
    }
  }

  /** Reads and discards messages until the read side fails (a close frame). */
  #drain(): Promise<void> {
    if (this.#draining === undefined) {
      this.#reading = true;
      this.#draining = (async () => {
        try {
          while (true) await this.#startMessage();
        } catch (error) {
          this.#failRead(error);
        } finally {
          this.#draining = undefined;
          this.#endRead();
        }
      })();
    }
    return this.#draining;
  }

  /**
   * Closes gracefully with 1000 (see {@linkcode Conn.closeGracefully}).
   *
   * @returns A promise that resolves once the transport is closed.
   */
  [Symbol.asyncDispose](): Promise<void> {
    return this.closeGracefully();
  }

  // ======================================================= read engine

  #beginRead(
    action: string,
    signal: AbortSignal | undefined,
    nextMessage = true,
  ): void {
    if (this.#reading) {
      throw new TypeError(`Cannot ${action}: another read is in progress`);
    }
    if (nextMessage && this.#handling) {
      // The application is done with the message it read.
      this.#handling = false;
      wakeAll(this.#readBegun);
    }
    if (this.#readErr !== undefined) throw this.#readErr;
    if (signal?.aborted) throw signal.reason;
    this.#reading = true;
    this.#readSignal = signal;
  }

  #endRead(): void {
    this.#reading = false;
    this.#readSignal = undefined;
    wakeAll(this.#readIdle);
  }

  /**
   * Fast path: a whole unfragmented data frame already buffered is read
   * without a single await. Returns undefined to take the general path.
   */
  #tryWholeMessage(): Message | undefined {
    const buf = this.#rview;
    const h = parseHeader(buf, this.#rpos, header);
    if (
      h === null || !h.fin || h.rsv1 || (h.opcode !== 1 && h.opcode !== 2)
    ) return undefined;
    const total = h.headerLength + h.length;
    if (
      this.#rend - this.#rpos < total || this.#headerProblem(h) !== undefined ||
      (this.#readLimit > 0 && h.length > this.#readLimit)
    ) return undefined;
    const start = this.#rpos + h.headerLength;
    const payload = buf.subarray(start, start + h.length);
    if (h.masked) maskInPlace(payload, h.maskKey, 0);
    this.#rpos += total;
    this.#messageSeq++;
    // A whole message leaves no decoder state behind, so one validator
    // serves every connection and an idle one keeps none.
    if (
      h.opcode === MESSAGE_TYPE.Text && !wholeMessageUtf8.push(payload, true)
    ) {
      throw invalidUtf8();
    }
    // A view, not a copy: allocating a small typed array costs ~0.4 us in
    // Deno, more than the rest of this path. The read buffer is then lent
    // and never overwritten (see #prepareFill).
    this.#lent = true;
    return { type: h.opcode, data: payload };
  }

  /** Whether a whole frame waits in the buffer (never throws). */
  #wholeFrameBuffered(): boolean {
    const available = this.#rend - this.#rpos;
    if (available < 2) return false;
    try {
      const h = parseHeader(this.#rview, this.#rpos, header);
      return h !== null && h.headerLength + h.length <= available;
    } catch {
      return false; // a bad length: the next read reports it
    }
  }

  /**
   * Moves to the first frame of the next data message, discarding what is
   * left of the current one.
   */
  async #startMessage(): Promise<void> {
    if (this.#messagePending && this.#messageCompressed) this.#dropInflated();
    while (this.#messagePending) {
      if (this.#remaining > 0) await this.#skipPayload();
      else if (this.#frameFin) this.#messagePending = false;
      else await this.#nextDataFrame();
    }
    await this.#nextDataFrame();
    this.#messagePending = true;
    this.#messageSeq++;
  }

  /**
   * Reads frame headers, handling control frames on the way, until the
   * header of a data frame that is legal here; it becomes the current frame.
   */
  async #nextDataFrame(): Promise<void> {
    while (true) {
      let h = parseHeader(this.#rview, this.#rpos, header);
      while (h === null) {
        await this.#fill(MAX_HEADER_LENGTH);
        h = parseHeader(this.#rview, this.#rpos, header);
      }
      const problem = this.#headerProblem(h);
      if (problem !== undefined) {
        throw new ProtocolError(problem, CLOSE_CODE.ProtocolError);
      }
      if (h.opcode >= 8) {
        const total = h.headerLength + h.length;
        if (this.#rend - this.#rpos < total) {
          // Parsed again after the wait: the shared header may change.
          await this.#fill(total);
          continue;
        }
        const start = this.#rpos + h.headerLength;
        const payload = this.#rbuf.slice(start, start + h.length);
        this.#rpos += total;
        if (h.masked) maskInPlace(payload, h.maskKey, 0);
        await this.#handleControl(h.opcode, payload);
        continue;
      }
      const length = h.length;
      const continuation = h.opcode === OPCODE.Continuation;
      const before = continuation ? this.#messageLength : 0;
      // A compressed message is bounded by its inflated size instead, which
      // is what the application cares about (a bomb is small on the wire);
      // its compressed bytes are inflated as they arrive, never held whole.
      if (
        this.#readLimit > 0 && before + length > this.#readLimit &&
        !(continuation ? this.#messageCompressed : h.rsv1)
      ) {
        throw new ReadLimitError(this.#readLimit);
      }
      this.#rpos += h.headerLength;
      if (h.opcode !== OPCODE.Continuation) {
        this.#messageType = h.opcode as DataMessageType;
        this.#messageLength = 0;
        // A compressed message's text is validated once inflated.
        this.#messageCompressed = h.rsv1;
        this.#inflateDone = false;
        this.#validating = h.opcode === MESSAGE_TYPE.Text && !h.rsv1;
        if (h.opcode === MESSAGE_TYPE.Text) this.#utf8 ??= new Utf8Validator();
      }
      this.#messageLength += length;
      this.#remaining = length;
      this.#frameFin = h.fin;
      this.#messageOpen = !h.fin;
      this.#frameMasked = h.masked;
      if (h.masked) (this.#frameKey ??= new Uint8Array(4)).set(h.maskKey);
      this.#maskPos = 0;
      if (length === 0 && this.#validating && h.fin) {
        this.#checkUtf8(new Uint8Array(0));
      }
      return;
    }
  }

  /** Every problem of a header, joined into one close reason, or undefined. */
  #headerProblem(h: FrameHeader): string | undefined {
    if (this.#headerIsLegal(h)) return undefined;
    const problems: string[] = [];
    const add = (problem: string) => problems.push(problem);
    const opcode = h.opcode;
    // RFC 7692 section 6: RSV1 marks a compressed message on its first frame
    // only, and only once permessage-deflate was negotiated.
    if (h.rsv1) {
      if (this.#compression === undefined) {
        add("RSV1 set with no extension negotiated");
      } else if (opcode >= 8) {
        add("RSV1 set on a control frame");
      } else if (opcode === OPCODE.Continuation) {
        add("RSV1 set on a continuation frame");
      }
    }
    if (h.rsv2) add("RSV2 set");
    if (h.rsv3) add("RSV3 set");
    if ((opcode > 2 && opcode < 8) || opcode > 10) {
      add(`reserved opcode ${opcode}`);
    } else if (opcode >= 8) {
      if (!h.fin) add("fragmented control frame");
      if (h.length > MAX_CONTROL_PAYLOAD) {
        add(`control frame payload of ${h.length} bytes`);
      }
    } else if (opcode === OPCODE.Continuation) {
      if (!this.#messageOpen) add("continuation frame with no message open");
    } else if (this.#messageOpen) {
      add("new data frame while a fragmented message is open");
    }
    if (h.masked === this.#client) {
      add(
        this.#client
          ? "masked frame from server"
          : "unmasked frame from client",
      );
    }
    return `Invalid frame: ${problems.join(", ")}`;
  }

  /** The common case of {@linkcode Conn.#headerProblem}, without allocating. */
  #headerIsLegal(h: FrameHeader): boolean {
    if (h.rsv2 || h.rsv3 || h.masked === this.#client) return false;
    const opcode = h.opcode;
    if (opcode === OPCODE.Text || opcode === OPCODE.Binary) {
      return !this.#messageOpen && (!h.rsv1 || this.#compression !== undefined);
    }
    if (h.rsv1) return false;
    if (opcode === OPCODE.Continuation) return this.#messageOpen;
    return opcode >= 8 && opcode <= 10 && h.fin &&
      h.length <= MAX_CONTROL_PAYLOAD;
  }

  async #handleControl(opcode: number, payload: Uint8Array): Promise<void> {
    if (opcode === OPCODE.Ping) {
      const result = this.#pingHandler
        ? this.#pingHandler(payload)
        : this.#defaultPingHandler(payload);
      if (result) await result;
    } else if (opcode === OPCODE.Pong) {
      const result = this.#pongHandler?.(payload);
      if (result) await result;
    } else {
      const { code, reason } = parseClosePayload(payload);
      this.#closeReceived = true;
      // The read side is over from here, even if the handler's close frame
      // gets the transport closed before it returns.
      const closeError = new CloseError(code, reason);
      this.#readErr = closeError;
      // Both close frames have now crossed: RFC 6455 section 7.1.1 says to
      // close the TCP connection. A close sent by the handler below does
      // the same from writeControl().
      if (this.#closeSent) this.#closeAfterFlush();
      const result = this.#closeHandler
        ? this.#closeHandler(code, reason)
        : this.#defaultCloseHandler(code);
      if (result) await result;
      throw closeError;
    }
  }

  /** Unmasks and validates payload bytes just consumed from the current frame. */
  #consume(chunk: Uint8Array): void {
    this.#remaining -= chunk.length;
    if (this.#frameMasked) {
      this.#maskPos = maskInPlace(chunk, this.#frameKey!, this.#maskPos);
    }
    if (this.#validating) this.#checkUtf8(chunk);
  }

  #checkUtf8(chunk: Uint8Array): void {
    const final = this.#remaining === 0 && this.#frameFin;
    if (!this.#utf8!.push(chunk, final)) throw invalidUtf8();
  }

  /** Fills `dest` (at most the frame's remaining bytes) with payload. */
  async #readPayloadInto(dest: Uint8Array): Promise<void> {
    let filled = 0;
    while (filled < dest.length) {
      let n = this.#rend - this.#rpos;
      if (n > 0) {
        n = Math.min(n, dest.length - filled);
        dest.set(this.#rbuf.subarray(this.#rpos, this.#rpos + n), filled);
        this.#rpos += n;
      } else if (dest.length - filled >= this.#readBufferSize) {
        // Large payloads are read straight into their destination.
        const got = await this.#transportRead(dest.subarray(filled));
        n = got;
      } else {
        await this.#fill(1);
        continue;
      }
      this.#consume(dest.subarray(filled, filled + n));
      filled += n;
    }
  }

  /**
   * Reads the payload of a single-frame message into one buffer with
   * FRAME_HEADROOM free bytes in front, straight from the transport where it
   * is large, and returns the payload's view: no pieces to join. Allocating
   * the whole frame before its bytes arrive is safe up to MAX_CHUNK because
   * large buffers are committed lazily (calloc'd pages become resident only
   * when written), so a header that merely claims a big length costs
   * address space, not memory.
   */
  async #readFramePayload(): Promise<Uint8Array> {
    const length = this.#remaining;
    const buffer = new ArrayBuffer(FRAME_HEADROOM + length);
    const data = new Uint8Array(buffer, FRAME_HEADROOM, length);
    await this.#readPayloadInto(data);
    headroomBuffers.add(buffer);
    return data;
  }

  /** Consumes the rest of the current frame's payload without keeping it. */
  async #skipPayload(): Promise<void> {
    while (this.#remaining > 0) {
      if (this.#rend === this.#rpos) await this.#fill(1);
      const n = Math.min(this.#rend - this.#rpos, this.#remaining);
      const chunk = this.#rbuf.subarray(this.#rpos, this.#rpos + n);
      this.#rpos += n;
      this.#consume(chunk);
    }
  }

  /** One streaming read of message `seq` into `buffer`. */
  async #readStream(seq: number, buffer: Uint8Array): Promise<number | null> {
    if (seq !== this.#messageSeq || !this.#messagePending) {
      if (seq !== this.#messageSeq) {
        throw new TypeError(
          "Cannot read message: a newer message was started",
        );
      }
      return null;
    }
    this.#beginRead("read message", undefined, false);
    try {
      if (this.#messageCompressed) return await this.#readInflated(buffer);
      while (this.#remaining === 0) {
        if (this.#frameFin) {
          this.#messagePending = false;
          return null;
        }
        await this.#nextDataFrame();
      }
      if (buffer.length === 0) return 0;
      const dest = buffer.subarray(0, Math.min(buffer.length, this.#remaining));
      if (this.#rend === this.#rpos && dest.length < this.#readBufferSize) {
        await this.#fill(1);
      }
      let n = this.#rend - this.#rpos;
      if (n > 0) {
        n = Math.min(n, dest.length);
        dest.set(this.#rbuf.subarray(this.#rpos, this.#rpos + n));
        this.#rpos += n;
      } else {
        n = await this.#transportRead(dest);
      }
      this.#consume(dest.subarray(0, n));
      if (this.#remaining === 0 && this.#frameFin) this.#messagePending = false;
      return n;
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
  }

  /** One streaming read of a compressed message: inflated bytes. */
  async #readInflated(buffer: Uint8Array): Promise<number | null> {
    while (true) {
      const queue = this.#inflated;
      if (queue !== undefined && queue.length > 0) {
        if (buffer.length === 0) return 0;
        const chunk = queue[0];
        const from = this.#inflatedPos;
        const n = Math.min(buffer.length, chunk.length - from);
        buffer.set(chunk.subarray(from, from + n));
        if (from + n < chunk.length) {
          this.#inflatedPos = from + n;
        } else {
          queue.shift();
          this.#inflatedPos = 0;
          if (queue.length === 0 && this.#inflateDone) this.#dropInflated();
        }
        return n;
      }
      if (this.#inflateDone) {
        this.#dropInflated();
        return null;
      }
      if (this.#remaining === 0 && !this.#frameFin) {
        await this.#nextDataFrame();
        continue;
      }
      const chunks = await this.#inflateNext();
      if (chunks.length > 0) (this.#inflated ??= []).push(...chunks);
    }
  }

  /**
   * Inflates the next piece of the current compressed message, unmasked:
   * the rest of the current frame when the read buffer holds it, otherwise
   * up to INFLATE_PIECE bytes of it gathered first (one inflate call per
   * frame is much cheaper than one per read: each call costs a few stream
   * writes), or nothing at the end of a frame. Returns the inflated chunks
   * (the caller owns them), text already checked as UTF-8.
   */
  async #inflateNext(): Promise<Uint8Array[]> {
    let piece: Uint8Array = EMPTY;
    if (this.#remaining > 0) {
      if (this.#rend - this.#rpos >= this.#remaining) {
        // A view of the read buffer: nothing reads into it until the
        // inflate below is over, and the inflater is done with it by then.
        piece = this.#rbuf.subarray(this.#rpos, this.#rpos + this.#remaining);
        this.#rpos += piece.length;
        this.#consume(piece);
      } else {
        piece = new Uint8Array(Math.min(this.#remaining, INFLATE_PIECE));
        await this.#readPayloadInto(piece);
      }
    }
    const final = this.#remaining === 0 && this.#frameFin;
    const limit = this.#readLimit === 0 ? Infinity : this.#readLimit;
    const slot = this.#inflaterSlot ??= new InflaterSlot();
    let chunks: Uint8Array[];
    try {
      chunks = await slot.inflate(piece, final, limit);
    } catch (error) {
      if (!(error instanceof InflateError)) throw error;
      // Either way the peer sent something we must refuse (RFC 6455 section
      // 7.4.1): 1009 past the read limit, 1007 for data that is not DEFLATE.
      if (error.code === CLOSE_CODE.MessageTooBig) {
        throw new ReadLimitError(this.#readLimit, { cause: error });
      }
      throw new ProtocolError(
        "Invalid compressed message: the payload is not a valid DEFLATE stream",
        CLOSE_CODE.InvalidFramePayloadData,
        { cause: error },
      );
    }
    if (final) this.#inflateDone = true;
    if (this.#messageType === MESSAGE_TYPE.Text) {
      const utf8 = this.#utf8!;
      for (const chunk of chunks) {
        if (!utf8.push(chunk, false)) throw invalidUtf8();
      }
      if (final && !utf8.push(EMPTY, true)) throw invalidUtf8();
    }
    return chunks;
  }

  /**
   * Forgets the current compressed message's inflated bytes; when it is
   * abandoned part-way, resets the inflater and the UTF-8 state too.
   */
  #dropInflated(): void {
    this.#inflated = undefined;
    this.#inflatedPos = 0;
    if (!this.#inflateDone) {
      this.#inflaterSlot?.release();
      this.#utf8?.reset();
      this.#inflateDone = true;
    }
    this.#messagePending = this.#remaining > 0 || !this.#frameFin;
  }

  /**
   * Reads once from the transport into the read buffer, first making room
   * for `need` unparsed bytes in total. Only a partial header or control
   * frame is ever left unparsed (payload is consumed as it comes), so the
   * bytes moved here are few. An idle connection reads into a small buffer
   * (its pending read holds just that); a read that fills the buffer makes
   * the next one full size, and a short read makes it small again.
   */
  async #fill(need: number): Promise<void> {
    const space = this.#prepareFill(need);
    this.#commitFill(space, await this.#transportRead(space));
  }

  /** The synchronous first half of {@linkcode Conn.#fill}: where to read. */
  #prepareFill(need: number): Uint8Array {
    if (this.#burst) this.#uncork();
    const pending = this.#rend - this.#rpos;
    const size = Math.max(
      need,
      this.#bigReads
        ? this.#readBufferSize
        : Math.min(IDLE_READ_SIZE, this.#readBufferSize),
    );
    let buf = this.#rbuf;
    if (this.#lent) {
      // The application holds views of bytes before #rpos: never move or
      // overwrite them. Read on into the free tail while it is roomy,
      // otherwise into a fresh buffer.
      if (
        buf.length !== size || buf.length - this.#rpos < need ||
        buf.length - this.#rend < MIN_TAIL
      ) {
        buf = new Uint8Array(size);
        buf.set(this.#rbuf.subarray(this.#rpos, this.#rend));
        this.#rbuf = buf;
        this.#rpos = 0;
        this.#rend = pending;
        this.#lent = false;
      }
    } else if (pending === 0) {
      this.#rpos = this.#rend = 0;
      if (buf.length !== size) buf = this.#rbuf = new Uint8Array(size);
    } else if (buf.length === this.#rend || buf.length - this.#rpos < need) {
      if (buf.length >= size) {
        buf.copyWithin(0, this.#rpos, this.#rend);
      } else {
        buf = new Uint8Array(size);
        buf.set(this.#rbuf.subarray(this.#rpos, this.#rend));
        this.#rbuf = buf;
      }
      this.#rpos = 0;
      this.#rend = pending;
    }
    if (pending === 0) this.#rview = EMPTY;
    return this.#rend === 0 ? buf : buf.subarray(this.#rend);
  }

  /** The second half of {@linkcode Conn.#fill}: `n` bytes arrived in `space`. */
  #commitFill(space: Uint8Array, n: number): void {
    this.#rend += n;
    this.#rview = this.#rbuf.subarray(0, this.#rend);
    if (n === space.length && n >= IDLE_READ_SIZE) this.#bigReads = true;
    else if (n < IDLE_READ_SIZE / 2) this.#bigReads = false;
  }

  /**
   * Starts one transport read, bounded by the read deadline and signal.
   * Not an async function: the idle wait in readMessage() awaits it
   * directly, so an idle connection keeps no extra suspended frames.
   */
  #startRead(buffer: Uint8Array): Promise<number | null> {
    const read = this.#transport.read(buffer);
    if (this.#readDeadline === undefined && this.#readSignal === undefined) {
      return read;
    }
    return (this.#readDeadline ??= new Deadline("read"))
      .bound(read, this.#readSignal);
  }

  /** One transport read; EOF and transport failures become errors. */
  async #transportRead(buffer: Uint8Array): Promise<number> {
    let n: number | null;
    try {
      n = await this.#startRead(buffer);
    } catch (error) {
      throw this.#readError(error);
    }
    if (n === null) throw unexpectedEOF();
    return n;
  }

  /** Maps a failed transport read to what the read rejects with. */
  #readError(error: unknown): unknown {
    if (
      error instanceof Deno.errors.TimedOut || isAbort(error, this.#readSignal)
    ) {
      return error;
    }
    if (this.#closed) return this.#readErr;
    return new CloseError(
      CLOSE_CODE.AbnormalClosure,
      `transport read failed: ${(error as Error)?.message ?? error}`,
      { cause: error },
    );
  }

  /**
   * Makes a read error sticky and reacts to it: a protocol error sends its
   * close frame and closes the transport; a dead transport is closed.
   */
  #failRead(error: unknown): unknown {
    if (this.#readErr !== undefined) return this.#readErr;
    this.#readErr = error;
    if (error instanceof ProtocolError) {
      this.#failConnection(error);
    } else if (
      error instanceof CloseError && error.code === CLOSE_CODE.AbnormalClosure
    ) {
      this.close();
    }
    return error;
  }

  /** Sends the close frame for a protocol error, then closes (RFC 7.1.7). */
  #failConnection(error: ProtocolError): void {
    if (this.#closeSent || this.#writeErr !== undefined) {
      this.close();
      return;
    }
    this.#closeSent = true;
    const payload = formatCloseMessage(error.code, closeReason(error.message));
    const written = this.#append(0x80 | OPCODE.Close, payload, true);
    const timer = setTimeout(() => this.close(), FAIL_CLOSE_TIMEOUT);
    const finish = () => {
      clearTimeout(timer);
      this.close();
    };
    written.then(finish, finish);
  }

  // ====================================================== write engine

  #writeBlocked(action: string): unknown {
    if (this.#writeErr !== undefined) return this.#writeErr;
    if (this.#closeSent) {
      return new CloseSentError(
        `Cannot ${action}: a close frame was already sent`,
      );
    }
    return undefined;
  }

  /**
   * Slow path of a message write: in turn behind writers and a full queue.
   * With `compress` (or a prepared message, whose compressed payload is
   * shared) the payload is compressed in turn, which keeps messages in order
   * however long each compression takes; RSV1 marks it (RFC 7692 section
   * 6). A payload the compressor fails on goes out uncompressed.
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
        const compressed = compress === true
          ? await compressMessage(payload)
          : await compressedPayloadOf(compress);
        if (compressed !== undefined) {
          b0 |= RSV1;
          payload = compressed;
        }
      }
      await this.#room();
      const blocked = this.#writeBlocked("write message");
      if (blocked !== undefined) throw blocked;
      written = this.#append(b0, payload, false);
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
  #room(): Promise<void> {
    if (this.#queued <= QUEUE_LIMIT || this.#writeErr !== undefined) {
      return RESOLVED;
    }
    return new Promise<void>((resolve) => this.#roomWaiters.push(resolve))
      .then(() => this.#room());
  }

  #wakeRoom(): void {
    if (this.#roomWaiters.length === 0) return;
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * Queues one frame. Small frames are copied into the coalescing buffer; a
   * large server payload is queued by reference as its own write, so the
   * caller must wait for it to be written before reusing its bytes.
   * Resolves at once while the queue is short, unless `wait`.
   */
  #append(b0: number, payload: Uint8Array, wait: boolean): Promise<void> {
    const length = payload.length;
    // The key is used up before #append returns, so one per connection
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
      // A payload a Conn read (see #readFramePayload): its header goes in
      // front of it and the frame leaves in one write, not two.
      const start = FRAME_HEADROOM - headerLength(length, false);
      const frame = new Uint8Array(payload.buffer, start, size);
      writeHeader(frame, 0, b0, length, undefined);
      this.#cutSegment();
      this.#segments.push(frame);
      byReference = true;
    } else {
      const buf = this.#reserve(MAX_HEADER_LENGTH);
      this.#wlen += writeHeader(buf, this.#wlen, b0, length, key);
      this.#cutSegment();
      if (key !== undefined) {
        const body = payload.slice();
        maskInPlace(body, key, 0);
        this.#segments.push(body);
      } else {
        this.#segments.push(payload);
        byReference = true;
      }
    }
    return this.#queue(size, wait || byReference);
  }

  /** Queues an already encoded frame (a prepared message). */
  #appendRaw(frame: Uint8Array): Promise<void> {
    if (frame.length < COPY_LIMIT) {
      const buf = this.#reserve(frame.length);
      buf.set(frame, this.#wlen);
      this.#wlen += frame.length;
    } else {
      this.#cutSegment();
      this.#segments.push(frame);
    }
    return this.#queue(frame.length, false);
  }

  #queue(size: number, wait: boolean): Promise<void> {
    this.#queued += size;
    const batch = this.#batch ??= new Batch();
    const urgent = wait || this.#queued > HIGH_WATER;
    if (urgent) batch.urgent = true;
    if (this.#inFlight === undefined) {
      if (this.#burst && !urgent) this.#cork();
      else this.#uncork();
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
    this.#uncorkTimer = setTimeout(() => this.#uncork(), 0);
  }

  /** Starts writing whatever is queued (see {@linkcode Conn.#cork}). */
  #uncork(): void {
    this.#burst = false;
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
      this.#batchBuffers.push(buf);
    }
    const pooled = this.#pool === undefined
      ? freeWriteBuffers.get(this.#writeBufferSize)?.pop()
      : this.#pool.get();
    if (pooled !== undefined && pooled.length >= size) {
      buf = pooled;
    } else {
      // Too small for this frame: the pooled buffer goes straight back.
      if (pooled !== undefined) this.#recycle(pooled);
      buf = new Uint8Array(Math.max(size, this.#writeBufferSize));
    }
    this.#wbuf = buf;
    this.#wstart = this.#wlen = 0;
    return buf;
  }

  /** Ends the open piece of the coalescing buffer as a segment. */
  #cutSegment(): void {
    if (this.#wbuf !== undefined && this.#wlen > this.#wstart) {
      this.#segments.push(this.#wbuf.subarray(this.#wstart, this.#wlen));
      this.#wstart = this.#wlen;
    }
  }

  /** Writes batches until none is queued. Never rejects. */
  async #flush(): Promise<void> {
    while (this.#batch !== undefined) {
      if (this.#burst && !this.#batch.urgent) {
        this.#cork();
        return;
      }
      const batch = this.#batch;
      this.#batch = undefined;
      this.#inFlight = batch;
      this.#cutSegment();
      const segments = this.#segments;
      this.#segments = [];
      const buffers = this.#batchBuffers;
      this.#batchBuffers = [];
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
            offset += this.#writeDeadline === undefined
              ? await write
              : await this.#writeDeadline.bound(write);
          }
        }
      } catch (error) {
        this.#failWrite(error);
        this.#inFlight = undefined;
        batch.reject(this.#writeErr);
        this.#rejectQueued(this.#writeErr);
        this.#wakeRoom();
        return;
      }
      this.#queued -= bytes;
      for (const buffer of buffers) this.#recycle(buffer);
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
    if (buffer.length !== this.#writeBufferSize) return;
    let free = freeWriteBuffers.get(buffer.length);
    if (free === undefined) freeWriteBuffers.set(buffer.length, free = []);
    if (free.length < FREE_WRITE_BUFFERS) free.push(buffer);
  }

  #rejectQueued(error: unknown): void {
    const batch = this.#batch;
    this.#batch = undefined;
    this.#segments = [];
    this.#batchBuffers = [];
    this.#wbuf = undefined;
    this.#wstart = this.#wlen = 0;
    batch?.reject(error);
  }

  #failWrite(error: unknown): void {
    if (this.#writeErr !== undefined) return;
    if (error instanceof Deno.errors.TimedOut) {
      this.#writeErr = error;
    } else {
      this.#writeErr = this.#closed
        ? new ConnectionClosedError(
          "Cannot write: the connection was closed",
          { cause: error },
        )
        : new CloseError(
          CLOSE_CODE.AbnormalClosure,
          `transport write failed: ${(error as Error)?.message ?? error}`,
          { cause: error },
        );
    }
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
      else if (isAbort(error, signal)) this.#writeErr ??= error;
      throw error;
    });
  }

  /** Closes the transport once every queued frame is written (or 1 s). */
  #closeAfterFlush(): void {
    const pending = this.#batch ?? this.#inFlight;
    if (pending === undefined) {
      this.close();
      return;
    }
    const timer = setTimeout(() => this.close(), FAIL_CLOSE_TIMEOUT);
    const finish = () => {
      clearTimeout(timer);
      this.close();
    };
    pending.promise.then(finish, finish);
  }
}

/** Wakes and forgets every waiter of a list. */
function wakeAll(waiters: (() => void)[]): void {
  if (waiters.length === 0) return;
  for (const wake of waiters.splice(0)) wake();
}

function unexpectedEOF(): CloseError {
  return new CloseError(CLOSE_CODE.AbnormalClosure, "unexpected EOF");
}

function invalidUtf8(): ProtocolError {
  return new ProtocolError(
    "Invalid text message: the payload is not valid UTF-8",
    CLOSE_CODE.InvalidFramePayloadData,
  );
}

function deadlineOf(time: Date | null, action: string): number {
  if (time === null) return 0;
  if (!(time instanceof Date) || Number.isNaN(time.getTime())) {
    throw new TypeError(`Cannot ${action}: expected a valid Date or null`);
  }
  return Math.max(time.getTime(), 1);
}

function isAbort(error: unknown, signal: AbortSignal | undefined): boolean {
  return signal !== undefined && signal.aborted && error === signal.reason;
}

/** Settles an iteration step from a read message. */
function nextResult(value: Message): IteratorResult<Message> {
  return { value, done: false };
}

/** Ends the iteration on a normal close; anything else is thrown. */
function endOnNormalClose(error: unknown): IteratorResult<Message> {
  if (
    isCloseError(
      error,
      CLOSE_CODE.NormalClosure,
      CLOSE_CODE.GoingAway,
      CLOSE_CODE.NoStatusReceived,
    )
  ) return { value: undefined, done: true };
  throw error;
}

/**
 * The iterator behind `for await (const message of conn)`: a plain object
 * rather than an async generator, which would keep a suspended frame per
 * idle connection.
 */
class MessageIterator implements AsyncIterator<Message> {
  #conn: Conn;

  constructor(conn: Conn) {
    this.#conn = conn;
  }

  next(): Promise<IteratorResult<Message>> {
    return this.#conn.readMessage().then(nextResult, endOnNormalClose);
  }
}

/**
 * Collects the payload of a message read whole: pieces are filled (or
 * copied) into the free end of the last one, and a new one, at least as
 * large as everything so far, is made only when it is full. So a message of
 * n tiny fragments costs O(log n) arrays and at most twice its size, and a
 * message that fits one piece is returned without a copy.
 */
class PayloadBuilder {
  #done: Uint8Array[] = [];
  #tail: Uint8Array = EMPTY;
  #used = 0;
  /** Bytes collected so far. */
  total = 0;

  /** The free end of the last piece, or a new piece of `size` bytes. */
  space(size: number): Uint8Array {
    if (this.#used === this.#tail.length) {
      this.#seal();
      this.#tail = new Uint8Array(size);
      this.#used = 0;
    }
    return this.#tail.subarray(this.#used);
  }

  /** Records that `n` bytes were written into what space() returned. */
  commit(n: number): void {
    this.#used += n;
    this.total += n;
  }

  /** Appends an owned chunk: kept as it is when large, copied when small. */
  add(chunk: Uint8Array): void {
    const length = chunk.length;
    if (length <= this.#tail.length - this.#used) {
      this.#tail.set(chunk, this.#used);
    } else {
      this.#seal();
      if (this.total === 0 || length >= COPY_LIMIT) {
        this.#tail = chunk;
      } else {
        this.#tail = new Uint8Array(
          Math.min(Math.max(length, this.total), MAX_CHUNK),
        );
        this.#tail.set(chunk);
      }
      this.#used = 0;
    }
    this.#used += length;
    this.total += length;
  }

  #seal(): void {
    if (this.#used === 0) return;
    this.#done.push(
      this.#used === this.#tail.length
        ? this.#tail
        : this.#tail.subarray(0, this.#used),
    );
  }

  /** The whole payload in one array. */
  result(): Uint8Array {
    if (this.#done.length === 0) {
      return this.#used === this.#tail.length
        ? this.#tail
        : this.#tail.slice(0, this.#used);
    }
    this.#seal();
    const data = new Uint8Array(this.total);
    let offset = 0;
    for (const piece of this.#done) {
      data.set(piece, offset);
      offset += piece.length;
    }
    return data;
  }
}

/** Milliseconds between sweeps that free the inflaters of idle connections. */
const INFLATER_SWEEP_INTERVAL = 1000;
/** Connections holding an inflater, checked by the shared sweep. */
const inflaterSlots = new Set<InflaterSlot>();
let sweepTick = 0;
let sweepTimer: ReturnType<typeof setInterval> | undefined;

/**
 * Frees the inflater of every connection that has not inflated anything
 * since the previous sweep (idle for one to two intervals).
 */
function sweepInflaters(): void {
  sweepTick++;
  for (const slot of inflaterSlots) {
    if (!slot.busy && sweepTick - slot.used >= 2) slot.release();
  }
}

/**
 * A connection's {@linkcode MessageInflater}, kept while messages flow and
 * freed once the connection idles. Keeping it saves ~13 us per message (a
 * fresh DecompressionStream; measured 10 us reused vs 23-25 us fresh for a
 * 2 KiB JSON message), while an idle connection should not hold the ~58 KiB
 * of inflate state (issue 7, S6). One shared interval timer (unref'd, and
 * only while some connection holds an inflater) frees what has been unused
 * for over a second; a connection frees its own when it closes.
 */
class InflaterSlot {
  #inflater: MessageInflater | undefined;
  /** The sweep tick of the last use. */
  used = 0;
  /** A message is part-way through the inflater: it must not be freed. */
  busy = false;

  /** Inflates a piece of the current message (see MessageInflater). */
  async inflate(
    piece: Uint8Array,
    final: boolean,
    limit: number,
  ): Promise<Uint8Array[]> {
    if (this.#inflater === undefined) {
      this.#inflater = new MessageInflater();
      inflaterSlots.add(this);
      if (sweepTimer === undefined) {
        sweepTimer = setInterval(sweepInflaters, INFLATER_SWEEP_INTERVAL);
        Deno.unrefTimer(sweepTimer);
      }
    }
    this.used = sweepTick;
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

  /** Frees the inflater (a later message creates a new one). */
  release(): void {
    if (this.#inflater === undefined) return;
    this.#inflater.close();
    this.#inflater = undefined;
    this.busy = false;
    inflaterSlots.delete(this);
    if (inflaterSlots.size === 0 && sweepTimer !== undefined) {
      clearInterval(sweepTimer);
      sweepTimer = undefined;
    }
  }
}

/** The streaming writer behind {@linkcode Conn.nextWriter}. */
class FragmentWriter implements MessageWriter {
  #sink: WriterSink;
  #type: DataMessageType;
  #lock: Lock;
  #buffer: Uint8Array | undefined;
  #length = 0;
  #started = false;
  #closed = false;
  #chain: Promise<void>;
  /** Compress when the message reaches this size; -1: never. */
  #threshold: number;
  #deflater: MessageDeflater | undefined;
  /** A fragment failed: the message cannot be finished. */
  #error: unknown;

  constructor(
    sink: WriterSink,
    type: DataMessageType,
    lock: Lock,
    threshold: number,
  ) {
    this.#sink = sink;
    this.#type = type;
    this.#lock = lock;
    this.#chain = lock.ready;
    this.#threshold = threshold;
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
    return this.#then(() => this.#write(bytes));
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
    const size = this.#sink.fragmentSize;
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

  /**
   * Sends one fragment; waits until it is written when it borrows bytes.
   * When compressing, each fragment carries the compressed bytes of its
   * piece, and RSV1 is set on the first only (RFC 7692 section 6.1).
   */
  async #emit(
    payload: Uint8Array,
    fin: boolean,
    borrowed = false,
  ): Promise<void> {
    if (this.#error !== undefined) throw this.#error;
    try {
      const blocked = this.#sink.blocked("write message fragment");
      if (blocked !== undefined) throw blocked;
      let b0 = (fin ? 0x80 : 0) |
        (this.#started ? OPCODE.Continuation : this.#type);
      if (
        !this.#started && this.#threshold >= 0 &&
        !(fin && payload.length < this.#threshold)
      ) {
        // A message that ends within its first fragment is as small as it
        // looks; otherwise its size is unknown and it is compressed.
        this.#deflater = new MessageDeflater();
      }
      if (this.#deflater !== undefined) {
        const compressed = await this.#deflater.write(payload);
        if (compressed !== undefined) {
          if (!this.#started) b0 |= RSV1;
          payload = compressed;
          borrowed = false;
        } else if (!this.#started) {
          // Nothing is sent yet: the message goes out uncompressed.
          this.#deflater.close();
          this.#deflater = undefined;
        } else {
          const error = new ProtocolError(
            "Cannot write message fragment: the compressor's output was malformed",
            CLOSE_CODE.InternalServerErr,
          );
          this.#sink.fail(error);
          throw error;
        }
        if (fin) this.#deflater?.close();
      }
      await this.#sink.room();
      this.#started = true;
      const written = this.#sink.append(b0, payload);
      this.#length = 0;
      if (borrowed || fin) await written;
    } catch (error) {
      this.#error = error;
      this.#deflater?.close();
      this.#deflater = undefined;
      throw error;
    }
  }
}
