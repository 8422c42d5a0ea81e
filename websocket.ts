/**
 * The WHATWG `WebSocket` interface over a {@linkcode Conn}, on both sides:
 * code written for Deno's built-in `WebSocket` and `Deno.upgradeWebSocket`
 * moves here by changing an import, and gains compression, proxies, custom
 * headers, a read limit and backpressure.
 *
 * @example Echo server and client
 * ```ts title="Echo with the WebSocket interface"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import { upgradeWebSocket, WebSocket } from "@denows/websocket/websocket";
 *
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = upgradeWebSocket(request);
 *   socket.onmessage = (event) => socket.send(event.data);
 *   return response;
 * });
 *
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
 * ws.onopen = () => ws.send("hello");
 * const message = await new Promise<MessageEvent>((resolve) => ws.onmessage = resolve);
 * assert.equal(message.data, "hello");
 * ws.close(1000, "done");
 * const closed = await new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
 * assert.equal(closed.code, 1000);
 * assert.equal(closed.wasClean, true);
 * await server.shutdown();
 * ```
 *
 * @module
 */

import { CloseError, type Conn, MESSAGE_TYPE } from "./conn.ts";
import { Dialer, type DialerOptions } from "./dialer.ts";
import { CLOSE_CODE, formatCloseMessage } from "./frame.ts";
import {
  isWebSocketUpgrade,
  Upgrader,
  type UpgraderOptions,
} from "./upgrader.ts";
import { onClosed } from "./_close_watch.ts";
import { TOKEN } from "./_http.ts";
import { KEEPALIVE_EXPIRED } from "./_keepalive.ts";
import { checkClose, formatExtensions, parseWebSocketUrl } from "./_web.ts";

/**
 * Options of the {@linkcode WebSocket} constructor's third argument: the
 * {@linkcode DialerOptions} (compression, TLS, proxy, read limit, timeouts)
 * and the request `headers`. Subprotocols come from the second argument.
 */
export interface WebSocketOptions extends Omit<DialerOptions, "subprotocols"> {
  /** Extra headers for the opening handshake request. */
  headers?: HeadersInit;
}

/**
 * Options of {@linkcode upgradeWebSocket}: those of
 * `Deno.upgradeWebSocket` (`protocol`, `idleTimeout`) and the
 * {@linkcode UpgraderOptions}.
 */
export interface UpgradeWebSocketOptions extends UpgraderOptions {
  /**
   * The subprotocol to answer with, as `Deno.upgradeWebSocket` does; use
   * `subprotocols` instead to have one chosen from the client's offer.
   */
  protocol?: string;
  /**
   * Seconds within which a silent peer must answer a ping, as Deno's: after
   * half of it in silence a ping is sent, and when nothing arrives in the
   * other half the connection closes with 1001 and the socket fires `error`
   * and a `close` of 1001, "No response from ping frame." (default 30; 0
   * turns it off). `pingInterval` / `pongTimeout`, when given, win.
   */
  idleTimeout?: number;
  /** Extra headers for the 101 response (cookies, say). */
  headers?: HeadersInit;
}

/** What {@linkcode upgradeWebSocket} returns, as `Deno.upgradeWebSocket`. */
export interface WebSocketUpgrade {
  /** The server side of the WebSocket, CONNECTING until the 101 went out. */
  socket: WebSocket;
  /**
   * What the handler returns. `serve()` has already taken the connection
   * over, so it never sends it; if the request did not come from `serve()`
   * it is a 500, since nothing could be upgraded.
   */
  response: Response;
}

/** The values of {@linkcode WebSocket.readyState}. */
const CONNECTING = 0 as const;
const OPEN = 1 as const;
const CLOSING = 2 as const;
const CLOSED = 3 as const;

const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
const encoder = new TextEncoder();
const noop = () => {};
const EVENT_TYPES = ["open", "message", "error", "close"] as const;

/** Set by {@linkcode upgradeWebSocket} for the constructor it calls. */
let adopting: Promise<Conn> | undefined;

/** WHATWG WebSockets § constructor steps 9-10: tokens, none twice. */
function parseProtocols(protocols: string | string[] | undefined): string[] {
  const list = protocols === undefined
    ? []
    : typeof protocols === "string"
    ? [protocols]
    : [...protocols].map(String);
  const seen = new Set<string>();
  for (const protocol of list) {
    if (!TOKEN.test(protocol)) {
      throw new DOMException(
        `Cannot open WebSocket: ${
          JSON.stringify(protocol)
        } is not a valid subprotocol`,
        "SyntaxError",
      );
    }
    if (seen.has(protocol)) {
      throw new DOMException(
        `Cannot open WebSocket: subprotocol ${
          JSON.stringify(protocol)
        } is offered twice`,
        "SyntaxError",
      );
    }
    seen.add(protocol);
  }
  return list;
}

/** The byte length `send()` adds to `bufferedAmount` (§ send() steps). */
function byteLength(data: string | ArrayBufferLike | ArrayBufferView | Blob) {
  if (typeof data === "string") return encoder.encode(data).length;
  if (data instanceof Blob) return data.size;
  return data.byteLength;
}

/**
 * A WebSocket with the WHATWG interface (WHATWG WebSockets § The WebSocket
 * interface). `new WebSocket(url, protocols, options)` dials a server; a
 * {@linkcode serve} handler gets the server side from
 * {@linkcode upgradeWebSocket}.
 *
 * Events: `open`, `message` (a `MessageEvent` with a string, or a `Blob` /
 * `ArrayBuffer` per {@linkcode WebSocket.binaryType}), `error`, and `close`
 * (a `CloseEvent`). An exception in a listener is reported as `dispatchEvent`
 * reports it and never stops the socket from reading.
 *
 * @example Binary messages as ArrayBuffers
 * ```ts title="binaryType"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import { upgradeWebSocket, WebSocket } from "@denows/websocket/websocket";
 *
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = upgradeWebSocket(request, {
 *     enableCompression: true,
 *   });
 *   socket.onopen = () => socket.send(new Uint8Array([1, 2, 3]));
 *   return response;
 * });
 *
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`, [], {
 *   enableCompression: true,
 * });
 * ws.binaryType = "arraybuffer";
 * const message = await new Promise<MessageEvent>((resolve) => ws.onmessage = resolve);
 * assert.deepEqual(new Uint8Array(message.data), new Uint8Array([1, 2, 3]));
 * assert.equal(ws.extensions.startsWith("permessage-deflate"), true);
 * ws.close();
 * await new Promise((resolve) => ws.onclose = resolve);
 * await server.shutdown();
 * ```
 */
export class WebSocket extends EventTarget {
  /** The connection has not yet been established. */
  static readonly CONNECTING: 0 = CONNECTING;
  /** The connection is established and communication is possible. */
  static readonly OPEN: 1 = OPEN;
  /** The closing handshake has started. */
  static readonly CLOSING: 2 = CLOSING;
  /** The connection is closed or could not be opened. */
  static readonly CLOSED: 3 = CLOSED;
  /** The connection has not yet been established. */
  readonly CONNECTING: 0 = CONNECTING;
  /** The connection is established and communication is possible. */
  readonly OPEN: 1 = OPEN;
  /** The closing handshake has started. */
  readonly CLOSING: 2 = CLOSING;
  /** The connection is closed or could not be opened. */
  readonly CLOSED: 3 = CLOSED;

  readonly #url: string;
  #readyState: number = CONNECTING;
  #protocol = "";
  #extensions = "";
  #binaryType: BinaryType = "blob";
  #bufferedAmount = 0;
  #conn: Conn | undefined;
  /** Aborts the opening handshake when close() comes first. */
  readonly #abort = new AbortController();
  /** The peer's close frame, once it arrived: the close is clean. */
  #peerClose: { code: number; reason: string } | undefined;
  /** Sends waiting behind a Blob being read, so that order is kept. */
  #queue: Promise<void> | undefined;
  readonly #handlers = new Map<string, ((event: Event) => unknown) | null>();

  /**
   * Opens a client WebSocket to `url`, as the standard constructor does.
   *
   * @param url `ws:`, `wss:`, or `http:` / `https:` for those.
   * @param protocols Subprotocols to offer, in order of preference.
   * @param options The dialer's settings and extra request headers.
   * @throws {DOMException} `SyntaxError` for a URL that is invalid, has a
   * fragment or another scheme, and for an invalid or repeated subprotocol.
   * @throws {TypeError} As the {@linkcode Dialer} constructor, for a bad
   * option.
   * @throws {RangeError} As the {@linkcode Dialer} constructor, for a bad
   * size or time.
   */
  constructor(
    url: string | URL,
    protocols?: string | string[],
    options: WebSocketOptions = {},
  ) {
    super();
    const adoption = adopting;
    adopting = undefined;
    if (adoption !== undefined) {
      this.#url = String(url);
      adoption.then((conn) => this.#open(conn), () => this.#closed(true));
      return;
    }
    const parsed = parseWebSocketUrl(url, "WebSocket");
    const offered = parseProtocols(protocols);
    this.#url = parsed.href;
    const { headers, ...settings } = options;
    const dialer = new Dialer({ ...settings, subprotocols: offered });
    dialer.dial(parsed, { headers, signal: this.#abort.signal }).then(
      ({ conn, response }) =>
        this.#open(conn, response.headers.get("sec-websocket-extensions")),
      () => this.#closed(true),
    );
  }

  /**
   * The URL the socket was opened with (§ url); on the server, the
   * request's URL as `ws:` or `wss:`.
   */
  get url(): string {
    return this.#url;
  }

  /** `CONNECTING`, `OPEN`, `CLOSING` or `CLOSED` (§ readyState). */
  get readyState(): number {
    return this.#readyState;
  }

  /**
   * Bytes that `send()` queued and that have not been handed to the
   * connection yet; after closing, what was sent since (§ bufferedAmount).
   */
  get bufferedAmount(): number {
    return this.#bufferedAmount;
  }

  /** The negotiated extensions, `""` before open or when none (§ extensions). */
  get extensions(): string {
    return this.#extensions;
  }

  /** The negotiated subprotocol, `""` before open or when none (§ protocol). */
  get protocol(): string {
    return this.#protocol;
  }

  /** What binary messages arrive as: `"blob"` (default) or `"arraybuffer"`. */
  get binaryType(): BinaryType {
    return this.#binaryType;
  }

  set binaryType(value: BinaryType) {
    // § binaryType: other values are ignored (a WebIDL enum attribute).
    if (value === "blob" || value === "arraybuffer") this.#binaryType = value;
  }

  /** Handler for `open` events. */
  get onopen(): ((this: WebSocket, event: Event) => unknown) | null {
    return this.#handlers.get("open") ?? null;
  }

  set onopen(handler: ((this: WebSocket, event: Event) => unknown) | null) {
    this.#setHandler("open", handler);
  }

  /** Handler for `message` events. */
  get onmessage(): ((this: WebSocket, event: MessageEvent) => unknown) | null {
    return this.#handlers.get("message") ?? null;
  }

  set onmessage(
    handler: ((this: WebSocket, event: MessageEvent) => unknown) | null,
  ) {
    this.#setHandler("message", handler as (event: Event) => unknown);
  }

  /** Handler for `error` events. */
  get onerror(): ((this: WebSocket, event: Event) => unknown) | null {
    return this.#handlers.get("error") ?? null;
  }

  set onerror(handler: ((this: WebSocket, event: Event) => unknown) | null) {
    this.#setHandler("error", handler);
  }

  /** Handler for `close` events. */
  get onclose(): ((this: WebSocket, event: CloseEvent) => unknown) | null {
    return this.#handlers.get("close") ?? null;
  }

  set onclose(
    handler: ((this: WebSocket, event: CloseEvent) => unknown) | null,
  ) {
    this.#setHandler("close", handler as (event: Event) => unknown);
  }

  /**
   * HTML § Event handler attributes: the listener is added when a handler is
   * first set, so it keeps that place among the listeners.
   */
  #setHandler(type: string, handler: ((event: Event) => unknown) | null) {
    if (!this.#handlers.has(type)) {
      this.addEventListener(type, (event) => {
        this.#handlers.get(type)?.call(this, event);
      });
    }
    this.#handlers.set(type, typeof handler === "function" ? handler : null);
  }

  /**
   * Sends a message: a string as text, bytes or a `Blob` as binary, after
   * everything sent before (§ send()). Once closing has started, the data
   * is discarded and only counted in `bufferedAmount`.
   *
   * @param data The message.
   * @throws {DOMException} `InvalidStateError` while `CONNECTING`.
   */
  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void {
    if (this.#readyState === CONNECTING) {
      throw new DOMException(
        "Cannot send on a WebSocket that is still connecting",
        "InvalidStateError",
      );
    }
    if (
      typeof data !== "string" && !(data instanceof Blob) &&
      !ArrayBuffer.isView(data) && !(data instanceof ArrayBuffer) &&
      !(data instanceof SharedArrayBuffer)
    ) {
      data = String(data);
    }
    const length = byteLength(data);
    this.#bufferedAmount += length;
    const conn = this.#conn;
    if (this.#readyState !== OPEN || conn === undefined) return;
    if (data instanceof Blob) {
      const blob = data;
      this.#enqueue(async () => {
        this.#write(conn, new Uint8Array(await blob.arrayBuffer()), length);
      });
    } else if (typeof data === "string") {
      const text = data;
      this.#enqueue(() => this.#write(conn, text, length));
    } else {
      // Copied now: the caller may reuse its buffer once send() returned.
      const bytes = ArrayBuffer.isView(data)
        ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice()
        : new Uint8Array(data).slice();
      this.#enqueue(() => this.#write(conn, bytes, length));
    }
  }

  /** Runs `step` now, or after the Blob reads queued before it. */
  #enqueue(step: () => void | Promise<void>): void {
    if (this.#queue === undefined) {
      const result = step();
      if (result === undefined) return;
      this.#queue = result;
    } else {
      this.#queue = this.#queue.then(step);
    }
    const tail = this.#queue = this.#queue.catch(noop).then(() => {
      if (this.#queue === tail) this.#queue = undefined;
    });
  }

  /** Hands a message to the Conn; `bufferedAmount` drops once it took it. */
  #write(conn: Conn, data: string | Uint8Array, length: number): void {
    const type = typeof data === "string"
      ? MESSAGE_TYPE.Text
      : MESSAGE_TYPE.Binary;
    // A failed write means the connection is ending; the read loop reports it.
    conn.writeMessage(type, data).catch(noop).finally(() => {
      this.#bufferedAmount -= length;
    });
  }

  /**
   * Starts the closing handshake (§ close()): sends a close frame with the
   * code and reason (none without either), after the messages sent before.
   * While connecting, the opening handshake is abandoned and the socket
   * fails. Later calls do nothing.
   *
   * @param code 1000 or 3000-4999.
   * @param reason At most 123 bytes of UTF-8.
   * @throws {DOMException} `InvalidAccessError` for another code,
   * `SyntaxError` for a longer reason.
   */
  close(code?: number, reason?: string): void {
    const checked = checkClose(code, reason, "close WebSocket");
    code = checked.code;
    const text = checked.reason;
    if (this.#readyState === CLOSING || this.#readyState === CLOSED) return;
    const conn = this.#conn;
    this.#readyState = CLOSING;
    if (conn === undefined) {
      // § close() step 4: fail the WebSocket connection while connecting.
      this.#abort.abort();
      return;
    }
    // RFC 6455 section 5.5.1: 1005 stands for a close frame with no body.
    const sent = code ?? (text === "" ? CLOSE_CODE.NoStatusReceived : 1000);
    this.#enqueue(() => {
      conn.closeGracefully(sent, text).catch(noop);
    });
  }

  /** The opening handshake is done (§ Feedback from the protocol). */
  #open(conn: Conn, extensions?: string | null): void {
    if (this.#abort.signal.aborted) {
      // close() came while the handshake was finishing.
      conn.close();
      this.#closed(true);
      return;
    }
    this.#conn = conn;
    this.#protocol = conn.subprotocol;
    this.#extensions = extensions ?? formatExtensions(conn.compression);
    // Record the peer's close frame. Unless close() already sent one, echo
    // its code and reason as Deno's WebSocket does (RFC 6455 section 5.5.1);
    // § Feedback from the protocol: the closing handshake has started.
    const handler = conn.closeHandler();
    conn.setCloseHandler((code, reason) => {
      this.#peerClose = { code, reason };
      if (this.#readyState !== OPEN) return handler(code, reason);
      this.#readyState = CLOSING;
      return conn.writeControl(
        MESSAGE_TYPE.Close,
        formatCloseMessage(code, reason),
      ).catch(noop);
    });
    const ended = Promise.withResolvers<void>();
    onClosed(conn, ended.resolve);
    if (conn.closed) ended.resolve();
    this.#readyState = OPEN;
    this.dispatchEvent(new Event("open"));
    this.#read(conn, ended.promise);
  }

  /** Reads and dispatches messages until the connection ends. */
  async #read(conn: Conn, ended: Promise<void>): Promise<void> {
    const origin = new URL(this.#url.replace(/^ws/, "http")).origin;
    for (;;) {
      let message;
      try {
        message = await conn.readMessage();
      } catch (error) {
        if (error instanceof CloseError && this.#peerClose === undefined) {
          this.#peerClose = { code: error.code, reason: error.text };
        }
        break;
      }
      // § Feedback from the protocol: messages after close() are dropped.
      if (this.#readyState !== OPEN) continue;
      let data: string | Blob | ArrayBuffer;
      if (message.type === MESSAGE_TYPE.Text) {
        data = decoder.decode(message.data);
      } else if (this.#binaryType === "blob") {
        data = new Blob([message.data as Uint8Array<ArrayBuffer>]);
      } else {
        data = message.data.slice().buffer as ArrayBuffer;
      }
      this.dispatchEvent(new MessageEvent("message", { data, origin }));
    }
    await ended;
    this.#closed(false);
  }

  /**
   * § The WebSocket connection is closed: CLOSED, `error` first when the
   * connection failed, then `close`. A clean close needs the peer's close
   * frame (RFC 6455 section 7.1.4); without one the code is 1006, or
   * Deno's 1001 when a keepalive ping went unanswered.
   */
  #closed(failedToOpen: boolean): void {
    const clean = !failedToOpen && this.#peerClose !== undefined &&
      this.#peerClose.code !== CLOSE_CODE.AbnormalClosure;
    const wasClosing = this.#readyState === CLOSING;
    this.#readyState = CLOSED;
    if (failedToOpen || (!clean && !wasClosing)) {
      this.dispatchEvent(new Event("error"));
    }
    let code: number = CLOSE_CODE.AbnormalClosure;
    let reason = "";
    if (clean) ({ code, reason } = this.#peerClose!);
    else if (this.#peerClose?.reason === KEEPALIVE_EXPIRED) {
      code = CLOSE_CODE.GoingAway;
      reason = "No response from ping frame.";
    }
    this.dispatchEvent(
      new CloseEvent("close", { wasClean: clean, code, reason }),
    );
  }
}

for (const type of EVENT_TYPES) {
  // Enumerable like the WebIDL attributes they stand for.
  const name = `on${type}`;
  const descriptor = Object.getOwnPropertyDescriptor(
    WebSocket.prototype,
    name,
  )!;
  Object.defineProperty(WebSocket.prototype, name, {
    ...descriptor,
    enumerable: true,
  });
}

/** Deno's checks of `Deno.upgradeWebSocket`, with its TypeError wording. */
function checkUpgrade(request: Request): void {
  if (!isWebSocketUpgrade(request)) {
    throw new TypeError(
      "Invalid header: 'upgrade' must contain 'websocket' and 'connection' 'upgrade'",
    );
  }
  if (!request.headers.has("sec-websocket-key")) {
    throw new TypeError("Invalid header: 'sec-websocket-key' must be set");
  }
}

/**
 * Upgrades a request received by {@linkcode serve} to a
 * {@linkcode WebSocket}, as `Deno.upgradeWebSocket` does: the request is
 * checked at once, the connection taken over, and the handshake runs in the
 * background; the socket fires `open` once the 101 went out (or `error` and
 * `close` when the handshake was refused, already answered with a 4xx). The
 * handler returns `response`, which `serve()` never sends.
 *
 * @param request A request passed to a `serve()` handler, before it returned.
 * @param options `protocol` and `idleTimeout` as Deno's, and the
 * {@linkcode UpgraderOptions}.
 * @returns The socket and the response to return.
 * @throws {TypeError} For a request that is not a WebSocket upgrade, and as
 * the {@linkcode Upgrader} constructor for a bad option.
 * @throws {RangeError} As the {@linkcode Upgrader} constructor, for a bad
 * size or time.
 *
 * @example A server that greets with a subprotocol
 * ```ts title="upgradeWebSocket"
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket/upgrader";
 * import { upgradeWebSocket } from "@denows/websocket/websocket";
 *
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = upgradeWebSocket(request, { protocol: "chat" });
 *   socket.onopen = () => socket.close(4000, "bye");
 *   return response;
 * });
 *
 * const ws = new globalThis.WebSocket(`ws://127.0.0.1:${server.addr.port}/`, "chat");
 * const closed = await new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
 * assert.equal(closed.code, 4000);
 * assert.equal(closed.reason, "bye");
 * assert.equal(ws.protocol, "chat");
 * await server.shutdown();
 * ```
 */
export function upgradeWebSocket(
  request: Request,
  options: UpgradeWebSocketOptions = {},
): WebSocketUpgrade {
  checkUpgrade(request);
  const { protocol, idleTimeout = 30, headers: extra, ...settings } = options;
  if (!(Number.isFinite(idleTimeout) && idleTimeout >= 0)) {
    throw new RangeError(
      `Cannot upgrade to WebSocket: idleTimeout must be a finite number of seconds >= 0, got ${idleTimeout}`,
    );
  }
  const upgrader = new Upgrader({
    pingInterval: idleTimeout * 500,
    pongTimeout: idleTimeout > 0 ? idleTimeout * 500 : undefined,
    ...settings,
  });
  const headers = new Headers(extra);
  if (protocol !== undefined) headers.set("sec-websocket-protocol", protocol);
  const conn = upgrader.upgrade(request, headers);
  conn.catch(noop);
  // Deno's server socket reports "" here; the request's URL as ws: or wss:
  // says where the socket is, as a client's url does.
  const url = new URL(request.url);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  adopting = conn;
  const socket = new WebSocket(url);
  return {
    socket,
    response: new Response("The connection could not be taken over", {
      status: 500,
    }),
  };
}
