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
 * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
  CloseError,
  ConnectionClosedError,
  type DataMessageType,
  formatCloseMessage,
  isValidCloseCode,
  MAX_CONTROL_PAYLOAD,
  MESSAGE_TYPE,
  type MessageType,
  OPCODE,
  type ProtocolError,
} from "./frame.ts";
import { deadlineTime } from "./_deadline.ts";
import {
  Keepalive,
  KEEPALIVE_EXPIRED,
  type KeepaliveTarget,
} from "./_keepalive.ts";
import { closed } from "./_close_watch.ts";
import { checkCompressionLevel, checkConnSettings } from "./_options.ts";
import {
  closeAfterFlush,
  closeGracefully,
  failConnection,
} from "./_closing.ts";
import type { DeflateParameters } from "./deflate.ts";
import {
  DEFAULT_COMPRESSION_THRESHOLD,
  deflateSettings,
} from "./_deflate_stream.ts";
import {
  type Message,
  MessageIterator,
  type NextReaderResult,
  Reader,
  type ReaderHooks,
  type ReadOptions,
} from "./_reader.ts";
import {
  type BufferPool,
  isControlType,
  isDataType,
  type MessageWriter,
  PreparedMessage,
  toBytes,
  type WriteControlOptions,
  type WriteOptions,
  Writer,
  type WriterHooks,
} from "./_writer.ts";

export {
  CLOSE_CODE,
  type CloseCode,
  CloseError,
  CloseSentError,
  ConnectionClosedError,
  type DataMessageType,
  formatCloseMessage,
  isCloseError,
  isUnexpectedCloseError,
  MESSAGE_TYPE,
  type MessageType,
  ProtocolError,
  ReadLimitError,
} from "./frame.ts";
export type {
  Message,
  MessageReader,
  NextReaderResult,
  ReadOptions,
} from "./_reader.ts";
export {
  type BufferPool,
  type MessageWriter,
  PreparedMessage,
  type WriteControlOptions,
  type WriteOptions,
} from "./_writer.ts";

/**
 * The byte stream a {@linkcode Conn} runs over. `Deno.Conn` and
 * `Deno.TlsConn` satisfy it as they are.
 *
 * @example A transport that counts the bytes written
 * ```ts title="Wrapping a Deno.Conn"
 * import { Conn, MESSAGE_TYPE, type Transport } from "@denows/websocket";
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
 * Options of the {@linkcode Conn} constructor.
 *
 * @example A client with bigger buffers
 * ```ts title="Connection options"
 * import { Conn, type ConnOptions } from "@denows/websocket";
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
  /**
   * The compression level, gorilla's: -2 (Huffman only), -1 (zlib's
   * default), 0 (none) to 9 (best compression), 1 being the fastest that
   * compresses. When set, messages are compressed with node:zlib at that
   * level; unset, with the web-standard `CompressionStream`, which has no
   * level (it compresses as zlib's default, 6). See
   * {@linkcode Conn.setCompressionLevel}.
   */
  compressionLevel?: number;
  /**
   * The largest message the peer may send, in bytes (default 0: no limit,
   * as in gorilla); see {@linkcode Conn.setReadLimit}. The Upgrader and the
   * Dialer set 16 MiB unless told otherwise.
   */
  readLimit?: number;
  /**
   * Keepalive: after this many milliseconds in which nothing arrived, send a
   * ping (default 0: never). When nothing arrives within `pongTimeout` of
   * the ping either, the peer is taken for gone: a close frame with 1001
   * (going away) is sent without waiting for an answer, the transport is
   * closed, and reads reject with a {@linkcode CloseError} of 1006
   * (abnormal closure). Pongs, like every frame, are read by the
   * application's reads, so the connection must be read from meanwhile, as
   * in gorilla.
   */
  pingInterval?: number;
  /**
   * Milliseconds the peer has to answer a keepalive ping (default: the
   * `pingInterval`). Any frame counts as an answer.
   */
  pongTimeout?: number;
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

const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
const RESOLVED: Promise<void> = Promise.resolve();
const noop = () => {};

/** gorilla's default buffer sizes. */
const DEFAULT_BUFFER_SIZE = 4096;
/** Largest frame that must fit the read buffer at once: a control frame. */
const MAX_CONTROL_FRAME = 14 + MAX_CONTROL_PAYLOAD;
/** The hooks a Conn gives its reader and writer (made in Conn's static block). */
let hooksOf: (conn: Conn) => ReaderHooks & WriterHooks & KeepaliveTarget;

/**
 * A WebSocket connection: reads and writes messages over a
 * {@linkcode Transport}. One reader at a time, as in gorilla; writes are safe
 * from overlapping async callers (frames never interleave on the wire).
 *
 * @example Read messages with for await
 * ```ts title="Iterating over messages"
 * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
  #subprotocol: string;
  #compression: DeflateParameters | undefined;
  #closed = false;
  #reader: Reader;
  #writer: Writer;
  // Handlers; undefined means gorilla's default, which lives on the
  // prototype so that connections do not each hold closures for it.
  #closeHandler: CloseHandler | undefined;
  #pingHandler: ControlHandler | undefined;
  #pongHandler: ControlHandler | undefined;
  #keepalive: Keepalive | undefined;

  /**
   * Wraps a transport on which the opening handshake is complete.
   *
   * @param transport The byte stream (e.g. a `Deno.Conn`).
   * @param options The role and buffer settings.
   * @throws {TypeError} The role is neither `"server"` nor `"client"`, or
   * `compression` is not an object.
   * @throws {RangeError} A buffer size is not a positive integer, the
   * compression threshold or the read limit is not a non-negative integer,
   * or a keepalive time is not a valid number of milliseconds.
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
    checkConnSettings("Cannot create connection", options);
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
    const client = options.role === "client";
    const hooks = hooksOf(this);
    this.#subprotocol = options.subprotocol ?? "";
    this.#compression = compression;
    this.#reader = new Reader(transport, {
      client,
      bufferSize: Math.max(readBufferSize, MAX_CONTROL_FRAME),
      head: options.head,
      compression: compression !== undefined,
      contextTakeover: compression !== undefined &&
        !(client
          ? compression.serverNoContextTakeover
          : compression.clientNoContextTakeover),
    }, hooks);
    this.#writer = new Writer(transport, {
      client,
      bufferSize: Math.max(writeBufferSize, MAX_CONTROL_FRAME),
      pool: options.writeBufferPool,
      compressionThreshold: threshold,
      deflate: compression === undefined
        ? undefined
        : deflateSettings(compression, options.role, options.compressionLevel),
    }, hooks);
    if (options.readLimit) this.#reader.setLimit(options.readLimit);
    if (options.pingInterval) {
      this.#keepalive = new Keepalive(
        hooks,
        options.pingInterval,
        options.pongTimeout ?? options.pingInterval,
      );
    }
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
   * import { Conn } from "@denows/websocket";
   * import { DEFLATE_OFFER, negotiateDeflate } from "@denows/websocket";
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
  readMessage(options?: ReadOptions): Promise<Message> {
    return this.#reader.readMessage(options?.signal);
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
  nextReader(options?: ReadOptions): Promise<NextReaderResult> {
    return this.#reader.nextReader(options?.signal);
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
   * import { Conn } from "@denows/websocket";
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
    return new MessageIterator(this.#reader);
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
   * import { Conn } from "@denows/websocket";
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
    this.#reader.setLimit(limit);
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
   * import { Conn } from "@denows/websocket";
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
    this.#reader.setDeadline(deadlineTime(time, "set read deadline"));
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
    return this.#writer.writeMessage(type, bytes, bytes === data, signal);
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
    return this.#writer.nextWriter(type);
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
    let bytes: Uint8Array;
    let deadline = 0;
    try {
      if (!isControlType(type)) {
        throw new TypeError(
          `Cannot write control frame: ${type} is not a control type`,
        );
      }
      bytes = toBytes(data, "write control frame");
      if (bytes.length > MAX_CONTROL_PAYLOAD) {
        throw new RangeError(
          `Cannot write control frame: the payload is ${bytes.length} bytes, over 125`,
        );
      }
      if (options?.deadline !== undefined) {
        deadline = deadlineTime(options.deadline, "write control frame");
      }
    } catch (error) {
      return Promise.reject(error);
    }
    const blocked = this.#writer.blocked("write control frame");
    if (blocked !== undefined) return Promise.reject(blocked);
    const written = this.#writer.writeControl(type, bytes, deadline);
    if (type === MESSAGE_TYPE.Close && this.#reader.closeReceived) {
      closeAfterFlush(this, this.#writer);
    }
    return written;
  }

  /**
   * Writes `value` as a JSON text message.
   *
   * @param value Anything `JSON.stringify` accepts.
   * @throws {TypeError} The value does not serialise to JSON.
   *
   * @example Send JSON
   * ```ts title="writeJSON"
   * import { Conn } from "@denows/websocket";
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
    if (!isDataType(message.type)) {
      return this.writeControl(message.type, message.data);
    }
    return this.#writer.writePrepared(message);
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
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
    this.#writer.setDeadline(deadlineTime(time, "set write deadline"));
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
   * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
   * import { DEFLATE_OFFER, negotiateDeflate } from "@denows/websocket";
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
    this.#writer.compressWrites = enable;
  }

  /** Whether written messages are compressed when the extension is on. */
  get writeCompression(): boolean {
    return this.#writer.compressWrites;
  }

  /**
   * Sets the level later messages are compressed at (gorilla's
   * `SetCompressionLevel`): -2 (Huffman only), -1 (zlib's default), 0 (no
   * compression) to 9 (best compression); 1 is the fastest that
   * compresses, gorilla's default. Messages then go through node:zlib
   * instead of `CompressionStream`. It has no effect when compression was
   * not negotiated.
   *
   * @param level The level.
   * @throws {RangeError} The level is not an integer from -2 to 9.
   *
   * @example Compress at gorilla's default level
   * ```ts title="setCompressionLevel"
   * import assert from "node:assert/strict";
   * import { Conn, DEFLATE_OFFER, MESSAGE_TYPE, negotiateDeflate } from "@denows/websocket";
   *
   * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const [serverSocket, clientSocket] = await Promise.all([
   *   listener.accept(),
   *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
   * ]);
   * const compression = negotiateDeflate(DEFLATE_OFFER)?.parameters;
   * const server = new Conn(serverSocket, { role: "server", compression });
   * const client = new Conn(clientSocket, { role: "client", compression });
   * server.setCompressionLevel(1);
   * const text = JSON.stringify({ items: Array(100).fill("compressible") });
   * await server.writeMessage(MESSAGE_TYPE.Text, text);
   * assert.equal(new TextDecoder().decode((await client.readMessage()).data), text);
   * assert.throws(() => server.setCompressionLevel(10), RangeError);
   * await Promise.all([client.closeGracefully(), server.closeGracefully()]);
   * ```
   */
  setCompressionLevel(level: number): void {
    checkCompressionLevel("Cannot set compression level", level);
    const deflate = this.#writer.deflate;
    if (deflate !== undefined) this.#writer.deflate = { ...deflate, level };
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
   * import { Conn } from "@denows/websocket";
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
    if (!this.#writer.canReply) return;
    return this.writeControl(MESSAGE_TYPE.Close, formatCloseMessage(code))
      .catch(noop);
  }

  /** gorilla's default: answer with a pong carrying the same payload. */
  #defaultPingHandler(data: Uint8Array): Promise<void> | undefined {
    if (!this.#writer.canReply) return;
    return this.writeControl(MESSAGE_TYPE.Pong, data).catch(noop);
  }

  // =========================================================== closing

  /**
   * Closes the transport at once, without a closing handshake (gorilla's
   * `Close`). Pending reads and writes reject. Calling it again does nothing.
   *
   * @example Close immediately
   * ```ts title="close"
   * import { Conn } from "@denows/websocket";
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
    this.#keepalive?.stop();
    const error = new ConnectionClosedError(
      "Cannot use connection: it was closed",
    );
    this.#reader.close(error);
    this.#writer.close(error);
    try {
      this.#transport.close();
    } catch {
      // Already closed by its owner: nothing left to release.
    }
    closed(this);
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
   * import { CloseError, Conn } from "@denows/websocket";
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
    return closeGracefully(
      this,
      this.#reader,
      this.#writer,
      payload,
      timeout,
      options?.afterCurrentMessage ?? false,
    );
  }

  /**
   * Closes gracefully with 1000 (see {@linkcode Conn.closeGracefully}).
   *
   * @returns A promise that resolves once the transport is closed.
   */
  [Symbol.asyncDispose](): Promise<void> {
    return this.closeGracefully();
  }

  // The hooks are methods of one class rather than closures, so that every
  // Conn holds one small object for them, not a function per hook (~300 B
  // on each idle connection). Declared in here, it reaches private state.
  static {
    class Hooks implements ReaderHooks, WriterHooks, KeepaliveTarget {
      readonly #conn: Conn;

      constructor(conn: Conn) {
        this.#conn = conn;
      }

      control(opcode: number, payload: Uint8Array) {
        const conn = this.#conn;
        if (opcode === OPCODE.Pong) return conn.#pongHandler?.(payload);
        return conn.#pingHandler
          ? conn.#pingHandler(payload)
          : conn.#defaultPingHandler(payload);
      }

      closeReceived(code: number, reason: string) {
        const conn = this.#conn;
        // Both close frames have now crossed: RFC 6455 section 7.1.1 says to
        // close the TCP connection. A close sent by the handler does the
        // same from writeControl().
        if (conn.#writer.closeSent) closeAfterFlush(conn, conn.#writer);
        return conn.#closeHandler
          ? conn.#closeHandler(code, reason)
          : conn.#defaultCloseHandler(code);
      }

      fail(error: ProtocolError) {
        failConnection(this.#conn, this.#conn.#writer, error);
      }

      close() {
        this.#conn.close();
      }

      burst(more: boolean) {
        this.#conn.#writer.burst = more;
      }

      uncork() {
        this.#conn.#writer.uncork();
      }

      get arrivals() {
        return this.#conn.#reader.arrivals;
      }

      ping() {
        this.#conn.writeControl(MESSAGE_TYPE.Ping).catch(noop);
      }

      expired() {
        const conn = this.#conn;
        // Reads learn the truth at once; the peer, if it is only slow,
        // learns why from the close frame, which is not waited for.
        conn.#reader.close(
          new CloseError(CLOSE_CODE.AbnormalClosure, KEEPALIVE_EXPIRED),
        );
        failConnection(conn, conn.#writer, {
          code: CLOSE_CODE.GoingAway,
          message: "keepalive timeout",
        });
      }
    }
    hooksOf = (conn) => new Hooks(conn);
  }
}
