/**
 * `WebSocketStream` (WHATWG WebSockets standard, section "The
 * WebSocketStream interface") over a {@linkcode Conn}: messages as a
 * `ReadableStream` and a `WritableStream` with backpressure, on both sides
 * and without `--unstable-net`. A client opens one with
 * `new WebSocketStream(url)`, a {@linkcode serve} handler with
 * {@linkcode upgradeWebSocketStream}, and any `Conn` (from a `Dialer` or an
 * `Upgrader`) becomes one with {@linkcode WebSocketStream.fromConn}.
 *
 * @example Echo server and client
 * ```ts title="Echo over streams"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import {
 *   upgradeWebSocketStream,
 *   WebSocketStream,
 * } from "@denows/websocket/stream";
 *
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { stream, response } = upgradeWebSocketStream(request);
 *   stream.opened.then(({ readable, writable }) => readable.pipeTo(writable))
 *     .catch(() => {});
 *   return response;
 * });
 *
 * const client = new WebSocketStream(`ws://127.0.0.1:${server.addr.port}/`);
 * const { readable, writable } = await client.opened;
 * const writer = writable.getWriter();
 * const reader = readable.getReader();
 * await writer.write("hello");
 * assert.deepEqual(await reader.read(), { value: "hello", done: false });
 * await writer.close(); // sends a close frame with 1000
 * assert.deepEqual(await client.closed, { closeCode: 1000, reason: "" });
 * await server.shutdown();
 * ```
 *
 * @module
 */

import {
  CloseError,
  type Conn,
  ConnectionClosedError,
  MESSAGE_TYPE,
  ProtocolError,
} from "./conn.ts";
import {
  Dialer,
  type DialerOptions,
  type DialOptions,
  type DialResult,
} from "./dialer.ts";
import { CLOSE_CODE } from "./frame.ts";
import { Upgrader, type UpgraderOptions } from "./upgrader.ts";
import { onClosed } from "./_close_watch.ts";
import { checkClose, formatExtensions, parseWebSocketUrl } from "./_web.ts";

/** checkClose over a close info; a reason without a code means 1000. */
function checkCloseInfo(
  info: WebSocketCloseInfo,
  action: string,
): { code: number | undefined; reason: string } {
  const checked = checkClose(info.closeCode, info.reason, action);
  if (checked.code === undefined && checked.reason !== "") {
    checked.code = CLOSE_CODE.NormalClosure;
  }
  return checked;
}

/**
 * The close code and reason of {@linkcode WebSocketStream.close} and of a
 * {@linkcode WebSocketError} (the standard's `WebSocketCloseInfo`).
 */
export interface WebSocketCloseInfo {
  /**
   * 1000 or 3000-4999 (the codes a script may send, WHATWG WebSockets
   * `close()`); default 1000.
   */
  closeCode?: number;
  /** At most 123 bytes of UTF-8 (RFC 6455 section 5.5: 125 with the code). */
  reason?: string;
}

/** What {@linkcode WebSocketStream.closed} resolves with: the peer's close frame. */
export interface WebSocketClosedInfo {
  /** The code in the peer's close frame; 1005 when it had none. */
  closeCode: number;
  /** The reason in the peer's close frame, possibly empty. */
  reason: string;
}

/** What {@linkcode WebSocketStream.opened} resolves with (`WebSocketOpenInfo`). */
export interface WebSocketOpenInfo {
  /** Messages received: text as strings, binary as bytes. */
  readable: ReadableStream<string | Uint8Array<ArrayBuffer>>;
  /** Messages to send: strings as text, bytes as binary. */
  writable: WritableStream<string | ArrayBuffer | ArrayBufferView>;
  /** The negotiated extensions (`Sec-WebSocket-Extensions`), `""` when none. */
  extensions: string;
  /** The negotiated subprotocol, `""` when none. */
  protocol: string;
}

/**
 * Options of the {@linkcode WebSocketStream} constructor: the standard's
 * `protocols` and `signal`, the request `headers`, and the
 * {@linkcode DialerOptions} (compression, TLS, proxy, limits, timeouts).
 */
export interface WebSocketStreamOptions
  extends Omit<DialerOptions, "subprotocols">, DialOptions {
  /** Subprotocols to offer, in order of preference. */
  protocols?: string[];
  /** Aborts the opening handshake; ignored once the stream is open. */
  signal?: AbortSignal;
}

/** Options of {@linkcode WebSocketStream.fromConn}. */
export interface FromConnOptions {
  /** What {@linkcode WebSocketStream.url} reports (default `""`). */
  url?: string | URL;
}

/**
 * Options of {@linkcode upgradeWebSocketStream}: the
 * {@linkcode UpgraderOptions}, and like `Deno.upgradeWebSocket` a
 * `protocol` to answer with.
 */
export interface UpgradeWebSocketStreamOptions extends UpgraderOptions {
  /**
   * The subprotocol to answer with, as `Deno.upgradeWebSocket` does; use
   * `subprotocols` instead to have one chosen from the client's offer.
   */
  protocol?: string;
  /** Extra headers for the 101 response (cookies, say). */
  headers?: HeadersInit;
}

/** What {@linkcode upgradeWebSocketStream} returns. */
export interface WebSocketStreamUpgrade {
  /** The server side of the WebSocket. */
  stream: WebSocketStream;
  /**
   * What the handler returns. `serve()` has already taken the connection
   * over, so it never sends it; if the request did not come from `serve()`
   * it is a 500, since nothing could be upgraded.
   */
  response: Response;
}

const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
const noop = () => {};

/** Makes a {@linkcode WebSocketError} with a code no script may pass (1006, 1009, ...). */
let connectionError: (
  message: string,
  closeCode: number | null,
  cause?: unknown,
) => WebSocketError;

/**
 * A WebSocket closed or failed (the standard's `WebSocketError`). Passed to
 * `readable.cancel()` or `writable.abort()`, its code and reason are those
 * the close frame carries; {@linkcode WebSocketStream.closed} rejects with
 * one (code 1006) when the connection ended without a closing handshake.
 *
 * @example Cancel the readable with a close code
 * ```ts title="Closing with a WebSocketError"
 * import assert from "node:assert/strict";
 * import { WebSocketError } from "@denows/websocket/stream";
 *
 * const error = new WebSocketError("done", { closeCode: 4000, reason: "bye" });
 * assert.equal(error.name, "WebSocketError");
 * assert.equal(error.closeCode, 4000);
 * assert.throws(() => new WebSocketError("", { closeCode: 1001 }), {
 *   name: "InvalidAccessError",
 * });
 * ```
 */
export class WebSocketError extends DOMException {
  #closeCode: number | null;
  #reason: string;

  /**
   * Creates the error. A reason without a code implies 1000.
   *
   * @param message What happened.
   * @param init The close code and reason.
   * @throws {DOMException} `InvalidAccessError` for a code other than 1000
   * or 3000-4999, `SyntaxError` for a reason over 123 bytes.
   */
  constructor(message = "", init: WebSocketCloseInfo = {}) {
    super(message, "WebSocketError");
    const checked = checkCloseInfo(init, "create WebSocketError");
    this.#closeCode = checked.code ?? null;
    this.#reason = checked.reason;
  }

  /** The close code, or null when there is none. */
  get closeCode(): number | null {
    return this.#closeCode;
  }

  /** The close reason, possibly empty. */
  get reason(): string {
    return this.#reason;
  }

  static {
    connectionError = (message, closeCode, cause) => {
      const error = new WebSocketError(message);
      error.#closeCode = closeCode;
      Object.defineProperty(error, "cause", {
        value: cause,
        configurable: true,
        writable: true,
      });
      return error;
    };
  }
}

/** The message a written chunk becomes: strings are text, bytes binary. */
function toMessage(
  chunk: unknown,
): [
  typeof MESSAGE_TYPE.Text | typeof MESSAGE_TYPE.Binary,
  string | Uint8Array,
] {
  if (typeof chunk === "string") return [MESSAGE_TYPE.Text, chunk];
  if (chunk instanceof Uint8Array) return [MESSAGE_TYPE.Binary, chunk];
  if (ArrayBuffer.isView(chunk)) {
    return [
      MESSAGE_TYPE.Binary,
      new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength),
    ];
  }
  if (chunk instanceof ArrayBuffer) {
    return [MESSAGE_TYPE.Binary, new Uint8Array(chunk)];
  }
  throw new TypeError(
    "Cannot write to WebSocketStream: a chunk must be a string, an ArrayBuffer or an ArrayBufferView",
  );
}

/** Set by {@linkcode WebSocketStream.fromConn} for the constructor it calls. */
let adopting: { conn: Promise<Conn> } | undefined;

/**
 * A WebSocket as a pair of streams, after the WHATWG `WebSocketStream`.
 * `new WebSocketStream(url, options)` dials a server; a {@linkcode serve}
 * handler gets the server side from {@linkcode upgradeWebSocketStream}, and
 * {@linkcode WebSocketStream.fromConn} wraps a `Conn` already open.
 *
 * Reading is pulled: the connection is read only while the `readable` has
 * room, and its queue holds nothing beyond the message being read, so a
 * consumer that stops reading stops the socket being read and TCP holds the
 * peer back. Pings are answered, and a peer's close frame noticed, by those
 * reads (or while closing). `write()` resolves once the `Conn` accepted the
 * message, which applies its own backpressure.
 *
 * `closed` and `opened` are observed internally, so leaving one unawaited
 * never ends the process with an unhandled rejection.
 *
 * @example Close with a code and reason
 * ```ts title="The peer's close frame settles closed"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import {
 *   upgradeWebSocketStream,
 *   WebSocketStream,
 * } from "@denows/websocket/stream";
 *
 * const serverClosed = Promise.withResolvers<unknown>();
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { stream, response } = upgradeWebSocketStream(request);
 *   stream.opened.then(async ({ readable }) => {
 *     for await (const _ of readable); // reading notices the close frame
 *     serverClosed.resolve(await stream.closed);
 *   }).catch(serverClosed.reject);
 *   return response;
 * });
 *
 * const client = new WebSocketStream(`ws://127.0.0.1:${server.addr.port}/`);
 * await client.opened;
 * client.close({ closeCode: 4000, reason: "done" });
 * assert.deepEqual(await serverClosed.promise, { closeCode: 4000, reason: "done" });
 * // The server echoed the code (RFC 6455 section 5.5.1), without a reason.
 * assert.deepEqual(await client.closed, { closeCode: 4000, reason: "" });
 * await server.shutdown();
 * ```
 */
export class WebSocketStream {
  readonly #url: string;
  readonly #opened = Promise.withResolvers<WebSocketOpenInfo>();
  readonly #closed = Promise.withResolvers<WebSocketClosedInfo>();
  /** Aborts the opening handshake when close() comes first. */
  readonly #abort = new AbortController();
  #conn: Conn | undefined;
  /** The peer's close frame, once it arrived: the close is clean. */
  #peerClose: WebSocketClosedInfo | undefined;
  #closing: Promise<void> | undefined;

  /**
   * Opens a client WebSocket to `url` (`ws:`, `wss:`, or `http:` / `https:`
   * for those, as the WHATWG WebSocket constructor allows; `ws+unix:` as the
   * {@linkcode Dialer} does).
   *
   * @param url The server's URL.
   * @param options Subprotocols, an abort signal, headers and the dialer's
   * settings.
   * @throws {DOMException} `SyntaxError` for a URL that is invalid, has a
   * fragment or another scheme.
   * @throws {TypeError} As the {@linkcode Dialer} constructor, for a bad
   * subprotocol or option.
   * @throws {RangeError} As the {@linkcode Dialer} constructor, for a bad
   * size or time.
   */
  constructor(url: string | URL, options: WebSocketStreamOptions = {}) {
    this.#opened.promise.catch(noop);
    this.#closed.promise.catch(noop);
    const adoption = adopting;
    adopting = undefined;
    if (adoption !== undefined) {
      this.#url = String(url);
      adoption.conn.then(
        (conn) => this.#open(conn),
        (error) => this.#fail(error),
      );
      return;
    }
    const parsed = parseWebSocketUrl(url, "WebSocketStream");
    this.#url = parsed.href;
    const { protocols, signal, headers, ...settings } = options;
    const dialer = new Dialer({ ...settings, subprotocols: protocols });
    if (signal?.aborted) {
      this.#reject(signal.reason);
      return;
    }
    const aborting = signal === undefined
      ? this.#abort.signal
      : AbortSignal.any([signal, this.#abort.signal]);
    dialer.dial(parsed, { headers, signal: aborting }).then(
      ({ conn, response }: DialResult) =>
        this.#open(
          conn,
          response.headers.get("sec-websocket-extensions") ?? "",
        ),
      (error) =>
        aborting.aborted ? this.#reject(aborting.reason) : this.#fail(error),
    );
  }

  /**
   * Wraps a `Conn` that is already open (from a `Dialer` or an `Upgrader`);
   * the stream owns it from now on. Its close handler is kept and still
   * runs (by default it echoes the close frame).
   *
   * @param conn The open connection.
   * @param options The URL to report.
   * @returns The stream, its `opened` already resolving.
   *
   * @example Streams over a Dialer's connection
   * ```ts title="fromConn"
   * import assert from "node:assert/strict";
   * import { Dialer } from "@denows/websocket/dialer";
   * import { WebSocketStream } from "@denows/websocket/stream";
   *
   * const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
   *   const { socket, response } = Deno.upgradeWebSocket(request);
   *   socket.onopen = () => socket.send("welcome");
   *   return response;
   * });
   * const url = `ws://127.0.0.1:${server.addr.port}/`;
   * const { conn } = await new Dialer().dial(url);
   * const stream = WebSocketStream.fromConn(conn, { url });
   * const { readable } = await stream.opened;
   * const reader = readable.getReader();
   * assert.deepEqual(await reader.read(), { value: "welcome", done: false });
   * stream.close();
   * assert.equal((await stream.closed).closeCode, 1000);
   * await server.shutdown();
   * ```
   */
  static fromConn(conn: Conn, options: FromConnOptions = {}): WebSocketStream {
    adopting = { conn: Promise.resolve(conn) };
    return new WebSocketStream(options.url ?? "");
  }

  /** The URL dialed, or given to {@linkcode WebSocketStream.fromConn}. */
  get url(): string {
    return this.#url;
  }

  /**
   * Resolves once the opening handshake succeeded; rejects with the abort
   * reason of the signal, or a {@linkcode WebSocketError} (code 1006, the
   * failure as `cause`) when the handshake failed or `close()` came first.
   */
  get opened(): Promise<WebSocketOpenInfo> {
    return this.#opened.promise;
  }

  /**
   * Resolves with the peer's close code and reason once the closing
   * handshake completed (RFC 6455 section 7.1.4, the connection closed
   * cleanly); rejects like `opened` when the connection never opened, and
   * with a {@linkcode WebSocketError} of code 1006 when it ended without the
   * peer's close frame (RFC 6455 section 7.1.5).
   */
  get closed(): Promise<WebSocketClosedInfo> {
    return this.#closed.promise;
  }

  /**
   * Starts the closing handshake (RFC 6455 section 7.1.2): sends a close
   * frame, waits up to 5 s for the peer's, then closes the connection.
   * Before the stream is open, it abandons the opening handshake instead.
   * Later calls do nothing.
   *
   * @param closeInfo The code (default 1000) and reason.
   * @throws {DOMException} `InvalidAccessError` for a code other than 1000
   * or 3000-4999, `SyntaxError` for a reason over 123 bytes of UTF-8.
   */
  close(closeInfo: WebSocketCloseInfo = {}): void {
    const { code, reason } = checkCloseInfo(closeInfo, "close WebSocketStream");
    this.#startClose(code ?? CLOSE_CODE.NormalClosure, reason);
  }

  #startClose(code: number, reason: string): Promise<void> {
    if (this.#closing !== undefined) return this.#closing;
    const conn = this.#conn;
    if (conn === undefined) {
      // WHATWG WebSockets close(): while connecting, fail the connection.
      this.#abort.abort(
        connectionError(
          "The WebSocketStream was closed before it opened",
          CLOSE_CODE.AbnormalClosure,
        ),
      );
      this.#closing = Promise.resolve();
    } else {
      this.#closing = conn.closeGracefully(code, reason);
    }
    return this.#closing;
  }

  /**
   * Closes with the code and reason of a {@linkcode WebSocketError}, or
   * 1000 for any other reason (WHATWG WebSockets: "close using a
   * WebSocketError").
   */
  #closeWith(error: unknown): Promise<void> {
    if (error instanceof WebSocketError && error.closeCode !== null) {
      return this.#startClose(error.closeCode, error.reason);
    }
    return this.#startClose(CLOSE_CODE.NormalClosure, "");
  }

  /** The opening handshake failed: a WebSocketError with 1006 says why. */
  #fail(error: unknown): void {
    this.#reject(
      error instanceof WebSocketError ? error : connectionError(
        `Cannot open WebSocketStream: ${
          error instanceof Error ? error.message : String(error)
        }`,
        CLOSE_CODE.AbnormalClosure,
        error,
      ),
    );
  }

  /** The stream never opens: the abort reason, or what #fail made. */
  #reject(reason: unknown): void {
    this.#opened.reject(reason);
    this.#closed.reject(reason);
  }

  /**
   * The opening handshake is done. `extensions` is the client's
   * `Sec-WebSocket-Extensions` answer; without it, the one the negotiated
   * parameters stand for.
   */
  #open(conn: Conn, extensions?: string): void {
    if (this.#abort.signal.aborted) {
      // close() came while the handshake was finishing.
      conn.close();
      this.#fail(this.#abort.signal.reason);
      return;
    }
    this.#conn = conn;
    // Record the peer's close frame and let the handler that was there
    // (the default echoes it, RFC 6455 section 5.5.1) answer it.
    const handler = conn.closeHandler();
    conn.setCloseHandler((code, reason) => {
      this.#peerClose = { closeCode: code, reason };
      return handler(code, reason);
    });
    // When both close frames have crossed, the transport may close before
    // the close handler runs (RFC 6455 section 7.1.1), in the same turn.
    onClosed(conn, () => queueMicrotask(() => this.#ended()));
    if (conn.closed) this.#ended();
    const readable = new ReadableStream<string | Uint8Array<ArrayBuffer>>({
      pull: (controller) => this.#pull(conn, controller),
      cancel: (reason) => {
        this.#closeWith(reason);
      },
    }, { highWaterMark: 0 });
    const writable = new WritableStream<string | ArrayBuffer | ArrayBufferView>(
      {
        write: (chunk) => conn.writeMessage(...toMessage(chunk)),
        close: () => this.#startClose(CLOSE_CODE.NormalClosure, ""),
        abort: (reason) => this.#closeWith(reason),
      },
    );
    this.#opened.resolve({
      readable,
      writable,
      extensions: extensions ?? formatExtensions(conn.compression),
      protocol: conn.subprotocol,
    });
  }

  async #pull(
    conn: Conn,
    controller: ReadableStreamDefaultController<
      string | Uint8Array<ArrayBuffer>
    >,
  ): Promise<void> {
    let type, data;
    try {
      ({ type, data } = await conn.readMessage());
    } catch (error) {
      if (this.#peerClose !== undefined) controller.close();
      else controller.error(this.#failure(error));
      return;
    }
    if (type === MESSAGE_TYPE.Text) controller.enqueue(decoder.decode(data));
    else if (
      data.byteOffset === 0 && data.byteLength === data.buffer.byteLength
    ) {
      controller.enqueue(data as Uint8Array<ArrayBuffer>);
    } else {
      // A view into a larger buffer: hand out exactly the message's bytes.
      controller.enqueue(data.slice() as Uint8Array<ArrayBuffer>);
    }
  }

  /** The connection closed: cleanly if the peer's close frame came. */
  #ended(): void {
    if (this.#peerClose !== undefined) {
      this.#closed.resolve(this.#peerClose);
    } else {
      this.#closed.reject(this.#failure(undefined));
    }
  }

  /** The error for a connection that ended without a closing handshake. */
  #failure(error: unknown): WebSocketError {
    // A protocol error failed the connection with its code (RFC 6455
    // section 7.1.7); a CloseError here is 1006, the transport died.
    const code = error instanceof CloseError || error instanceof ProtocolError
      ? error.code
      : CLOSE_CODE.AbnormalClosure;
    return connectionError(
      error === undefined || error instanceof ConnectionClosedError
        ? "The WebSocket connection closed without a closing handshake"
        : `The WebSocket connection failed: ${
          error instanceof Error ? error.message : String(error)
        }`,
      code,
      error,
    );
  }
}

/**
 * Upgrades a request received by {@linkcode serve} to a
 * {@linkcode WebSocketStream}, as `Deno.upgradeWebSocket` gives a
 * `WebSocket`: the connection is taken over at once, and the handshake runs
 * in the background (`opened` settles with it; a refused handshake has
 * already been answered, with a 4xx, when `opened` rejects). The handler
 * returns `response`, which `serve()` never sends.
 *
 * @param request A request passed to a `serve()` handler, before it returned.
 * @param options The Upgrader's settings, a `protocol` to answer with and
 * extra 101 headers.
 * @returns The stream and the response to return.
 * @throws {TypeError} As the {@linkcode Upgrader} constructor, for a bad
 * subprotocol or option.
 * @throws {RangeError} As the {@linkcode Upgrader} constructor, for a bad
 * size or time.
 *
 * @example A server that greets and closes
 * ```ts title="upgradeWebSocketStream"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import { upgradeWebSocketStream } from "@denows/websocket/stream";
 *
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { stream, response } = upgradeWebSocketStream(request, { protocol: "chat" });
 *   stream.opened.then(async ({ writable }) => {
 *     const writer = writable.getWriter();
 *     await writer.write("hi");
 *     stream.close({ closeCode: 4000, reason: "bye" });
 *   }).catch(() => {});
 *   return response;
 * });
 *
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`, "chat");
 * const message = await new Promise<MessageEvent>((resolve) => ws.onmessage = resolve);
 * assert.equal(message.data, "hi");
 * const closed = await new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
 * assert.equal(closed.code, 4000);
 * assert.equal(ws.protocol, "chat");
 * await server.shutdown();
 * ```
 */
export function upgradeWebSocketStream(
  request: Request,
  options: UpgradeWebSocketStreamOptions = {},
): WebSocketStreamUpgrade {
  const { protocol, headers: extra, ...settings } = options;
  const upgrader = new Upgrader(settings);
  const headers = new Headers(extra);
  if (protocol !== undefined) headers.set("sec-websocket-protocol", protocol);
  const url = new URL(request.url);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  adopting = { conn: upgrader.upgrade(request, headers) };
  const stream = new WebSocketStream(url);
  return {
    stream,
    response: new Response("The connection could not be taken over", {
      status: 500,
    }),
  };
}
