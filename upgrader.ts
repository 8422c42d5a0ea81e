/**
 * The server side of the WebSocket opening handshake (RFC 6455 section 4.2):
 * {@linkcode Upgrader} validates an HTTP upgrade request, writes the
 * `101 Switching Protocols` response itself and returns a server-role
 * {@linkcode Conn} over the raw connection.
 *
 * `Deno.serve` cannot hand its connection over, so this module also exports
 * {@linkcode serve}, an HTTP/1.1 server with the same handler shape whose
 * requests `upgrader.upgrade(request)` can take over. Connections accepted
 * some other way are upgraded with {@linkcode Upgrader.upgradeConnection},
 * and a `node:http` server's `'upgrade'` event with
 * {@linkcode Upgrader.upgradeNode}.
 *
 * @example Echo server
 * ```ts title="Echo server"
 * import assert from "node:assert/strict";
 * import { serve, Upgrader } from "@denows/websocket/upgrader";
 *
 * const upgrader = new Upgrader();
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
 *   const conn = await upgrader.upgrade(request);
 *   const { type, data } = await conn.readMessage();
 *   await conn.writeMessage(type, data);
 *   await conn.closeGracefully(1000, "", { timeout: 1000 });
 * });
 *
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
 * await new Promise((resolve) => ws.onopen = resolve);
 * ws.send("hello");
 * const reply = await new Promise<MessageEvent>((resolve) =>
 *   ws.onmessage = resolve
 * );
 * assert.equal(reply.data, "hello");
 * await new Promise((resolve) => ws.onclose = resolve);
 * await server.shutdown();
 * ```
 *
 * @module
 */

import { type BufferPool, Conn, type Transport } from "./conn.ts";
import { negotiateDeflate } from "./deflate.ts";
import { CLOSE_CODE } from "./frame.ts";
import {
  type Closer,
  type HijackedConnection,
  takeConnection,
} from "./_hijack.ts";
import { closeQuietly, lingeringClose, writeAll } from "./_io.ts";
import {
  computeAcceptKey,
  HandshakeError,
  headerHasToken,
  isValidKey,
  parseTokenList,
} from "./_handshake.ts";
import {
  type NodeRequest,
  type NodeSocket,
  NodeTransport,
  requestFromNode,
} from "./_node.ts";
import { STATUS_TEXT, TOKEN } from "./_http.ts";
import { checkConnSettings, withDefaultReadLimit } from "./_options.ts";

export * from "./_serve.ts";
export { HandshakeError } from "./_handshake.ts";
export type { NodeRequest, NodeSocket } from "./_node.ts";

/** Headers of the 101 the Upgrader controls, which the application may not set. */
const RESERVED_HEADERS = [
  "upgrade",
  "connection",
  "sec-websocket-accept",
  // A 1xx response has no body, so no framing (RFC 9110 section 8.6).
  "content-length",
  "transfer-encoding",
];

/** Options for {@linkcode Upgrader}, after gorilla's `Upgrader` fields. */
export interface UpgraderOptions {
  /**
   * Milliseconds allowed for writing the handshake response (the 101, or an
   * error response); nothing more is read. On expiry the connection is
   * closed, and writing the 101 rejects with `Deno.errors.TimedOut` (a
   * refused handshake still rejects with its `HandshakeError`). Default and
   * `0`: no limit, as in gorilla.
   */
  handshakeTimeout?: number;
  /** Read buffer size for the `Conn`, in bytes (default 4096). */
  readBufferSize?: number;
  /** Write buffer size for the `Conn`, in bytes (default 4096). */
  writeBufferSize?: number;
  /** A pool the `Conn` takes its write buffers from between messages. */
  writeBufferPool?: BufferPool;
  /**
   * The subprotocols the server supports. When set, the first protocol in
   * the client's `Sec-WebSocket-Protocol` list that appears here is chosen
   * (the client's order, as in gorilla's main branch), or none. When unset,
   * a `Sec-WebSocket-Protocol` in the response headers is used as chosen.
   */
  subprotocols?: readonly string[];
  /**
   * Builds the error response for a refused handshake (gorilla's `Error`).
   * Default: a `text/plain` body with the reason phrase and
   * `Sec-WebSocket-Version: 13`. A 426 always carries `Upgrade: websocket`
   * and a 405 `Allow: GET`, whatever this returns. If it throws (or returns
   * no `Response`), the default response is sent and the upgrade rejects
   * with what it threw (or a `TypeError`).
   */
  error?: (
    request: Request,
    error: HandshakeError,
  ) => Response | Promise<Response>;
  /**
   * Decides whether the request's `Origin` is acceptable (refused: 403; if
   * it throws: 500, with what it threw as the `HandshakeError`'s cause).
   * Default: {@linkcode checkSameOrigin}.
   */
  checkOrigin?: (request: Request) => boolean | Promise<boolean>;
  /**
   * Negotiate permessage-deflate (RFC 7692) when the client offers it
   * (default false). The answer always asks for no context takeover in both
   * directions (see deflate.ts); {@linkcode Conn.compression} tells whether
   * a connection got it.
   */
  enableCompression?: boolean;
  /**
   * The level messages are compressed at, gorilla's -2 to 9 (1: fastest;
   * see `compressionLevel` of `ConnOptions`). Default: none, the
   * web-standard `CompressionStream`, which compresses as zlib's level 6.
   */
  compressionLevel?: number;
  /**
   * Use context takeover (RFC 7692 section 7.1.1; ws and browsers do by
   * default) in each direction the client does not refuse, for much better
   * compression of similar messages. The cost per connection and direction:
   * a 32 KiB window for its life, and the zlib state while messages flow
   * (about 250 KiB to compress at 15 window bits, 20-40 KiB to inflate), freed
   * after a second of idleness. A prepared message is then compressed for
   * each connection. Default false.
   */
  contextTakeover?: boolean;
  /**
   * With compression, data messages shorter than this many bytes are sent
   * uncompressed (default 256; `0` compresses everything).
   */
  compressionThreshold?: number;
  /**
   * The largest message a client may send, in bytes: a larger one fails the
   * connection with 1009 (message too big), and a compressed one is refused
   * once its inflated size passes the limit. Default 16 MiB (gorilla has
   * none; ws allows 100 MiB, Bun 16 MiB); `0` lifts the limit, as does
   * `conn.setReadLimit(0)` on one connection.
   */
  readLimit?: number;
  /**
   * Keepalive: ping a client that has sent nothing for this many
   * milliseconds, and drop it when it stays silent `pongTimeout` longer
   * (see `pingInterval` of `ConnOptions`). Default 0: no keepalive.
   */
  pingInterval?: number;
  /** Milliseconds a client has to answer a keepalive ping (default: `pingInterval`). */
  pongTimeout?: number;
  /**
   * Log every refused handshake to stderr with `console.warn`: the status,
   * the reason, the request's method and path and the client's address, so
   * an operator can see why clients fail (default true). The `error`
   * option sees each refusal either way.
   */
  logRefusals?: boolean;
}

/** Options for {@linkcode Upgrader.upgradeConnection} and {@linkcode Upgrader.upgradeNode}. */
export interface UpgradeConnectionOptions {
  /**
   * Bytes already read from the connection past the request head (pipelined
   * behind it): the `Conn` reads them first.
   */
  head?: Uint8Array;
  /** Extra headers for the 101 response (cookies, a chosen subprotocol). */
  responseHeaders?: HeadersInit;
}

/** The connection being upgraded, however it was obtained. */
interface Handover {
  transport: Transport & { closeWrite?(): Promise<void> };
  head: Uint8Array;
  /** serve()'s shutdown registry. */
  registry?: Pick<HijackedConnection, "track" | "untrack">;
}

/**
 * Forwards to a transport taken from serve(), and is the closer graceful
 * shutdown calls: registered from the start, unregistered when the
 * transport is closed. Being its own closer, it keeps no closure (and no
 * scope holding the Request) for as long as the connection lives.
 */
class UntrackOnClose implements Transport, Closer {
  /** The connection built over this transport, once the 101 is out. */
  conn: Conn | undefined;
  #inner: Handover["transport"];
  #untrack: HijackedConnection["untrack"];

  constructor(
    inner: Handover["transport"],
    registry: NonNullable<Handover["registry"]>,
  ) {
    this.#inner = inner;
    this.#untrack = registry.untrack;
    registry.track(this);
  }

  get localAddr(): Deno.Addr | undefined {
    return this.#inner.localAddr;
  }

  get remoteAddr(): Deno.Addr | undefined {
    return this.#inner.remoteAddr;
  }

  /** Half-closes (for lingering after an error response), when possible. */
  closeWrite(): Promise<void> {
    return this.#inner.closeWrite?.() ?? Promise.resolve();
  }

  /** Lets the Conn turn Nagle's algorithm off on the socket beneath. */
  setNoDelay(noDelay: boolean): void {
    (this.#inner as { setNoDelay?: (noDelay: boolean) => void }).setNoDelay?.(
      noDelay,
    );
  }

  read(buffer: Uint8Array): Promise<number | null> {
    return this.#inner.read(buffer);
  }

  write(data: Uint8Array): Promise<number> {
    return this.#inner.write(data);
  }

  close(): void {
    this.#untrack(this);
    this.#inner.close();
  }

  /**
   * serve()'s closer: mid-handshake just closes the socket, afterwards
   * closes the WebSocket with `code`. On shutdown (1001) the answer to a
   * message being handled goes out before the close frame; a failed handler
   * (1011) will answer nothing more.
   */
  closeWith(code: number, timeoutMs: number): Promise<void> {
    if (this.conn === undefined) {
      closeQuietly(this);
      return Promise.resolve();
    }
    return this.conn.closeGracefully(code, "", {
      timeout: timeoutMs,
      afterCurrentMessage: code === CLOSE_CODE.GoingAway,
    });
  }
}

/**
 * Upgrades HTTP requests to WebSocket connections (gorilla's `Upgrader`).
 * One Upgrader serves any number of requests concurrently.
 *
 * @example Upgrading requests from serve()
 * ```ts title="Upgrading requests from serve()"
 * import assert from "node:assert/strict";
 * import { MESSAGE_TYPE } from "@denows/websocket/frame";
 * import { serve, Upgrader } from "@denows/websocket/upgrader";
 *
 * const upgrader = new Upgrader({ subprotocols: ["chat"] });
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
 *   const conn = await upgrader.upgrade(request);
 *   await conn.writeMessage(MESSAGE_TYPE.Text, `protocol: ${conn.subprotocol}`);
 *   await conn.closeGracefully(1000, "bye", { timeout: 1000 });
 * });
 *
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`, ["chat"]);
 * const message = await new Promise<MessageEvent>((resolve) =>
 *   ws.onmessage = resolve
 * );
 * assert.equal(message.data, "protocol: chat");
 * const closed = await new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
 * assert.equal(closed.code, 1000);
 * await server.shutdown();
 * ```
 */
export class Upgrader {
  #options: UpgraderOptions;

  /**
   * Creates an Upgrader.
   *
   * @param options Handshake policy and buffer sizes for the connections.
   * @throws {TypeError} If a subprotocol is not an RFC 9110 token, or a
   * callback is not a function.
   * @throws {RangeError} If a buffer size is not a positive integer, the
   * compression threshold or the read limit is not a non-negative integer,
   * or the handshake timeout or a keepalive time is negative or not finite.
   */
  constructor(options: UpgraderOptions = {}) {
    checkConnSettings("Cannot create the Upgrader", options);
    const threshold = options.compressionThreshold;
    if (
      threshold !== undefined &&
      (!Number.isSafeInteger(threshold) || threshold < 0)
    ) {
      throw new RangeError(
        `Cannot create the Upgrader: compressionThreshold must be a non-negative integer, got ${threshold}`,
      );
    }
    for (const name of ["readBufferSize", "writeBufferSize"] as const) {
      const size = options[name];
      if (size !== undefined && (!Number.isSafeInteger(size) || size <= 0)) {
        throw new RangeError(
          `Cannot create the Upgrader: ${name} must be a positive integer, got ${size}`,
        );
      }
    }
    const timeout = options.handshakeTimeout;
    if (timeout !== undefined && !(timeout >= 0 && Number.isFinite(timeout))) {
      throw new RangeError(
        `Cannot create the Upgrader: handshakeTimeout must be a finite number of milliseconds >= 0, got ${timeout}`,
      );
    }
    if (
      options.subprotocols !== undefined && !Array.isArray(options.subprotocols)
    ) {
      throw new TypeError(
        "Cannot create the Upgrader: subprotocols must be an array of tokens",
      );
    }
    for (const protocol of options.subprotocols ?? []) {
      if (typeof protocol !== "string" || !TOKEN.test(protocol)) {
        throw new TypeError(
          `Cannot create the Upgrader: subprotocol ${
            JSON.stringify(protocol)
          } is not a valid token`,
        );
      }
    }
    for (const name of ["error", "checkOrigin"] as const) {
      if (options[name] !== undefined && typeof options[name] !== "function") {
        throw new TypeError(
          `Cannot create the Upgrader: ${name} must be a function`,
        );
      }
    }
    const pool = options.writeBufferPool;
    if (
      pool !== undefined &&
      (typeof pool?.get !== "function" || typeof pool?.put !== "function")
    ) {
      throw new TypeError(
        "Cannot create the Upgrader: writeBufferPool must have get() and put() methods",
      );
    }
    this.#options = {
      ...options,
      ...withDefaultReadLimit(options),
      subprotocols: options.subprotocols?.slice(),
    };
  }

  /**
   * Upgrades a request received by {@linkcode serve}: takes over the
   * connection it arrived on, validates the handshake, writes the 101 and
   * returns the `Conn`. Whatever the handler returns afterwards is ignored.
   * Bytes the client pipelined behind the request are read first by the
   * `Conn`. When `serve()` shuts down with its WebSockets, the `Conn` is
   * closed with 1001 (going away).
   *
   * @param request A request passed to a `serve()` handler.
   * @param responseHeaders Extra headers for the 101 response.
   * @returns The server-role connection.
   * @throws {HandshakeError} If the handshake is refused; the error response
   * has been written and the connection closed.
   * @throws {TypeError} If the request did not come from `serve()` or was
   * already taken over, or `responseHeaders` is invalid or sets a header the
   * Upgrader owns (the client gets a 500).
   * @throws {Deno.errors.TimedOut} If writing the response outlasts
   * `handshakeTimeout`.
   *
   * @example Passing cookies with the 101
   * ```ts title="Passing cookies with the 101"
   * import assert from "node:assert/strict";
   * import { MESSAGE_TYPE } from "@denows/websocket/frame";
   * import { serve, Upgrader } from "@denows/websocket/upgrader";
   *
   * const upgrader = new Upgrader();
   * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
   *   const conn = await upgrader.upgrade(request, { "set-cookie": "session=1" });
   *   await conn.writeMessage(MESSAGE_TYPE.Text, "welcome");
   *   await conn.closeGracefully(1000, "", { timeout: 1000 });
   * });
   *
   * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
   * const message = await new Promise<MessageEvent>((resolve) =>
   *   ws.onmessage = resolve
   * );
   * assert.equal(message.data, "welcome");
   * await new Promise((resolve) => ws.onclose = resolve);
   * await server.shutdown();
   * ```
   */
  upgrade(request: Request, responseHeaders?: HeadersInit): Promise<Conn> {
    const taken = takeConnection(request);
    if (taken === undefined) {
      return Promise.reject(
        new TypeError(
          "Cannot upgrade the request: it was not received by serve() or its connection was already taken over",
        ),
      );
    }
    return this.#handshake(
      { transport: taken.conn, head: taken.head, registry: taken },
      request,
      responseHeaders,
    );
  }

  /**
   * Upgrades a connection the application accepted and parsed itself: the
   * raw connection (any {@linkcode Transport}, e.g. a `Deno.Conn`), the
   * `Request` parsed from it, and the bytes read past the request head.
   *
   * @param conn The raw connection; the returned `Conn` owns it.
   * @param request The upgrade request read from `conn`.
   * @param options `head`: bytes read past the request head;
   * `responseHeaders`: extra headers for the 101.
   * @returns The server-role connection.
   * @throws {HandshakeError} If the handshake is refused; the error response
   * has been written and `conn` closed.
   * @throws {TypeError} If `responseHeaders` is invalid or sets a header the
   * Upgrader owns (the client gets a 500 and `conn` is closed).
   * @throws {Deno.errors.TimedOut} If writing the response outlasts
   * `handshakeTimeout`.
   *
   * @example Upgrading a connection from Deno.listen
   * ```ts title="Upgrading a connection from Deno.listen"
   * import assert from "node:assert/strict";
   * import { MESSAGE_TYPE } from "@denows/websocket/frame";
   * import { Upgrader } from "@denows/websocket/upgrader";
   *
   * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
   * const ws = new WebSocket(`ws://127.0.0.1:${listener.addr.port}/`);
   *
   * const tcp = await listener.accept();
   * // A real application parses the head with its own HTTP code; this one
   * // reads it whole and keeps what follows it.
   * const buffer = new Uint8Array(4096);
   * let length = 0;
   * let end = -1;
   * while (end < 0) {
   *   length += (await tcp.read(buffer.subarray(length)))!;
   *   end = new TextDecoder().decode(buffer.subarray(0, length)).indexOf("\r\n\r\n");
   * }
   * const [requestLine, ...lines] = new TextDecoder()
   *   .decode(buffer.subarray(0, end)).split("\r\n");
   * const request = new Request(
   *   `http://127.0.0.1${requestLine.split(" ")[1]}`,
   *   { headers: lines.map((line) => line.split(/:\s*(.*)/s, 2) as [string, string]) },
   * );
   *
   * const conn = await new Upgrader().upgradeConnection(tcp, request, {
   *   head: buffer.slice(end + 4, length),
   * });
   * const message = new Promise<MessageEvent>((resolve) =>
   *   ws.onmessage = resolve
   * );
   * const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
   * await conn.writeMessage(MESSAGE_TYPE.Text, "hi");
   * assert.equal((await message).data, "hi");
   * await conn.closeGracefully(1000, "", { timeout: 1000 });
   * assert.equal((await closed).code, 1000);
   * listener.close();
   * ```
   */
  upgradeConnection(
    conn: Transport,
    request: Request,
    options: UpgradeConnectionOptions = {},
  ): Promise<Conn> {
    const problem = !hasMethods(conn, ["read", "write", "close"])
      ? "conn must have read(), write() and close() methods"
      : !(request instanceof Request)
      ? "request must be a Request"
      : headProblem(options.head);
    if (problem !== undefined) {
      return Promise.reject(
        new TypeError(`Cannot upgrade the connection: ${problem}`),
      );
    }
    return this.#handshake(
      { transport: conn, head: options.head ?? new Uint8Array(0) },
      request,
      options.responseHeaders,
    );
  }

  /**
   * Upgrades from a `node:http` server's `'upgrade'` event, so existing
   * node:http servers can use this library: pass the event's request, socket
   * and `head` buffer. A request that cannot be represented as a web
   * `Request` (a TRACE, say) is refused with the default response, 405 when
   * its method is not GET and 400 otherwise, without calling the `error`
   * option (which takes a `Request`).
   *
   * @param request The `http.IncomingMessage` of the `'upgrade'` event.
   * @param socket The socket of the `'upgrade'` event; the `Conn` owns it.
   * @param options `head`: the event's `head` buffer; `responseHeaders`:
   * extra headers for the 101.
   * @returns The server-role connection.
   * @throws {HandshakeError} If the handshake is refused; the error response
   * has been written and the socket closed.
   * @throws {TypeError} If `responseHeaders` is invalid or sets a header the
   * Upgrader owns (the client gets a 500 and the socket is closed).
   * @throws {Deno.errors.TimedOut} If writing the response outlasts
   * `handshakeTimeout`.
   *
   * @example Upgrading from node:http
   * ```ts title="Upgrading from node:http"
   * import assert from "node:assert/strict";
   * import { createServer } from "node:http";
   * import type { AddressInfo } from "node:net";
   * import { Upgrader } from "@denows/websocket/upgrader";
   *
   * const upgrader = new Upgrader();
   * const server = createServer((_req, res) => res.end("plain HTTP"));
   * server.on("upgrade", async (req, socket, head) => {
   *   const conn = await upgrader.upgradeNode(req, socket, { head });
   *   const { type, data } = await conn.readMessage();
   *   await conn.writeMessage(type, data);
   *   await conn.closeGracefully(1000, "", { timeout: 1000 });
   * });
   * await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
   * const { port } = server.address() as AddressInfo;
   *
   * const ws = new WebSocket(`ws://127.0.0.1:${port}/`);
   * await new Promise((resolve) => ws.onopen = resolve);
   * ws.send("echo");
   * const reply = await new Promise<MessageEvent>((resolve) =>
   *   ws.onmessage = resolve
   * );
   * assert.equal(reply.data, "echo");
   * await new Promise((resolve) => ws.onclose = resolve);
   * await new Promise((resolve) => server.close(resolve));
   * ```
   */
  upgradeNode(
    request: NodeRequest,
    socket: NodeSocket,
    options: UpgradeConnectionOptions = {},
  ): Promise<Conn> {
    const problem =
      !hasMethods(socket, ["on", "write", "end", "destroy", "pause", "resume"])
        ? "socket must be the node socket of the 'upgrade' event"
        : !Array.isArray(request?.rawHeaders)
        ? "request must be the node http.IncomingMessage of the 'upgrade' event"
        : headProblem(options.head);
    if (problem !== undefined) {
      return Promise.reject(
        new TypeError(`Cannot upgrade the connection: ${problem}`),
      );
    }
    const transport = new NodeTransport(
      socket,
      options.head ?? new Uint8Array(0),
    );
    const webRequest = requestFromNode(request);
    if (webRequest === undefined) {
      const error = new HandshakeError(
        `Cannot upgrade the connection: the ${request.method} request cannot be represented as a web Request`,
        { status: request.method === "GET" ? 400 : 405 },
      );
      this.#logRefusal(
        error,
        request.method ?? "",
        request.url ?? "",
        transport,
      );
      return this.#respond(transport, defaultErrorResponse(error, null))
        .then(() => Promise.reject(error));
    }
    return this.#handshake(
      { transport, head: new Uint8Array(0) },
      webRequest,
      options.responseHeaders,
    );
  }

  /**
   * The handshake proper, in gorilla main's order (server.go `Upgrade`): each
   * refusal writes its error response and rejects; success writes the 101
   * and builds the `Conn` over the same transport.
   */
  async #handshake(
    handover: Handover,
    request: Request,
    responseHeadersInit: HeadersInit | undefined,
  ): Promise<Conn> {
    // A connection taken from serve() is registered with its graceful
    // shutdown from the start: mid-handshake the closer just closes the
    // socket, afterwards it closes the WebSocket with 1001. Whoever closes
    // the transport (a refusal, the application, the Conn on a fatal error,
    // the closer itself) unregisters it, so a long-running server keeps no
    // closer for a connection that has ended.
    const tracked = handover.registry === undefined
      ? undefined
      : new UntrackOnClose(handover.transport, handover.registry);
    const transport = tracked ?? handover.transport;
    const responseHeaders = await this.#responseHeaders(
      transport,
      request,
      responseHeadersInit,
    );
    const headers = request.headers;
    const refuse = (status: number, reason: string, cause?: unknown) =>
      this.#refuse(
        transport,
        request,
        new HandshakeError(`Cannot upgrade the connection: ${reason}`, {
          status,
          cause,
        }),
      );

    if (!headerHasToken(headers, "connection", "upgrade")) {
      return refuse(400, "the Connection header has no 'upgrade' token");
    }
    if (!headerHasToken(headers, "upgrade", "websocket")) {
      return refuse(426, "the Upgrade header has no 'websocket' token");
    }
    if (request.method !== "GET") {
      return refuse(405, `the request method is ${request.method}, not GET`);
    }
    if (!headerHasToken(headers, "sec-websocket-version", "13")) {
      return refuse(
        400,
        "the Sec-WebSocket-Version header does not offer version 13",
      );
    }
    if (responseHeaders.has("sec-websocket-extensions")) {
      return refuse(
        500,
        "the application set Sec-WebSocket-Extensions, which the Upgrader negotiates",
      );
    }
    let originAllowed: boolean;
    try {
      originAllowed = await (this.#options.checkOrigin ?? checkSameOrigin)(
        request,
      );
    } catch (error) {
      return refuse(500, "the origin check threw", error);
    }
    if (!originAllowed) {
      return refuse(
        403,
        `the origin ${JSON.stringify(headers.get("origin"))} is not allowed`,
      );
    }
    const key = headers.get("sec-websocket-key");
    if (key === null || !isValidKey(key)) {
      return refuse(
        400,
        "the Sec-WebSocket-Key header is not the base64 encoding of 16 bytes",
      );
    }

    const subprotocol = this.#options.subprotocols === undefined
      ? responseHeaders.get("sec-websocket-protocol") ?? ""
      : selectSubprotocol(this.#options.subprotocols, subprotocols(request));
    // permessage-deflate (RFC 7692 section 5): the first offer we can
    // honour is accepted; none leaves the extension off.
    const deflate = this.#options.enableCompression
      ? negotiateDeflate(headers.get("sec-websocket-extensions"), {
        contextTakeover: this.#options.contextTakeover,
      })
      : undefined;
    const lines = [
      "HTTP/1.1 101 Switching Protocols",
      "Upgrade: websocket",
      "Connection: Upgrade",
      `Sec-WebSocket-Accept: ${await computeAcceptKey(key)}`,
    ];
    if (subprotocol !== "") {
      lines.push(`Sec-WebSocket-Protocol: ${subprotocol}`);
    }
    if (deflate !== undefined) {
      lines.push(`Sec-WebSocket-Extensions: ${deflate.header}`);
    }
    for (const [name, value] of responseHeaders) {
      if (name !== "sec-websocket-protocol") lines.push(`${name}: ${value}`);
    }
    await this.#write(
      transport,
      new TextEncoder().encode(lines.join("\r\n") + "\r\n\r\n"),
    );

    const options = {
      role: "server",
      subprotocol,
      head: handover.head,
      readBufferSize: this.#options.readBufferSize,
      writeBufferSize: this.#options.writeBufferSize,
      writeBufferPool: this.#options.writeBufferPool,
      compression: deflate?.parameters,
      compressionThreshold: this.#options.compressionThreshold,
      compressionLevel: this.#options.compressionLevel,
      readLimit: this.#options.readLimit,
      pingInterval: this.#options.pingInterval,
      pongTimeout: this.#options.pongTimeout,
    } as const;
    let conn: Conn;
    try {
      conn = new Conn(transport, options);
    } catch (error) {
      // The 101 is out but there is no Conn to own the socket: close it.
      closeQuietly(transport);
      throw error;
    }
    if (tracked !== undefined) tracked.conn = conn;
    return conn;
  }

  /**
   * Validates the application's response headers. `Headers` already refuses
   * CR, LF and NUL in names and values, so nothing can inject a header line;
   * the headers the Upgrader writes itself may not be set either. Either
   * mistake is the application's: the client gets a 500 and the caller a
   * TypeError.
   */
  async #responseHeaders(
    transport: Handover["transport"],
    request: Request,
    init: HeadersInit | undefined,
  ): Promise<Headers> {
    let problem: string;
    let cause: unknown;
    try {
      const headers = new Headers(init);
      const reserved = RESERVED_HEADERS.find((name) => headers.has(name));
      const protocol = headers.get("sec-websocket-protocol");
      if (reserved !== undefined) {
        problem = `they set ${reserved}, which the Upgrader controls`;
      } else if (protocol !== null && !TOKEN.test(protocol)) {
        // RFC 6455 section 4.2.2: the server selects exactly one protocol.
        problem = `Sec-WebSocket-Protocol ${
          JSON.stringify(protocol)
        } is not a single token`;
      } else {
        return headers;
      }
    } catch (error) {
      problem = "they are not valid HTTP header fields";
      cause = error;
    }
    const internal = new HandshakeError("Internal Server Error", {
      status: 500,
    });
    await this.#respond(transport, defaultErrorResponse(internal, request));
    throw new TypeError(
      `Cannot upgrade the connection with these response headers: ${problem}`,
      { cause },
    );
  }

  /** Writes the error response for `error` and rejects with it. */
  async #refuse(
    transport: Handover["transport"],
    request: Request,
    error: HandshakeError,
  ): Promise<never> {
    this.#logRefusal(
      error,
      request.method,
      new URL(request.url).pathname,
      transport,
    );
    let response: Response;
    if (this.#options.error === undefined) {
      response = defaultErrorResponse(error, request);
    } else {
      try {
        response = await this.#options.error(request, error);
      } catch (callbackError) {
        // The client still gets an answer; the application gets its bug.
        await this.#respond(transport, defaultErrorResponse(error, request));
        throw callbackError;
      }
      if (!(response instanceof Response)) {
        await this.#respond(transport, defaultErrorResponse(error, request));
        throw new TypeError(
          "Cannot write the handshake error response: the error option did not return a Response",
          { cause: error },
        );
      }
    }
    await this.#respond(transport, withRequiredHeaders(response, error.status));
    throw error;
  }

  /** Tells the operator why a client was refused, unless told not to. */
  #logRefusal(
    error: HandshakeError,
    method: string,
    path: string,
    transport: Transport,
  ): void {
    if (this.#options.logRefusals === false) return;
    const from = transport.remoteAddr as Deno.NetAddr | undefined;
    const client = from?.hostname === undefined
      ? ""
      : ` from ${from.hostname}:${from.port}`;
    console.warn(
      `WebSocket handshake refused with ${error.status} for ${method} ${
        path.split("?", 1)[0]
      }${client}: ${error.message}`,
    );
  }

  /**
   * Writes an HTTP error response with `Connection: close` and closes the
   * connection: half-close first, then discard input until the client closes
   * (for at most a second) so unread input does not reset the
   * connection before the client has read the response. Never throws: the
   * caller reports why the handshake failed, and a client that is gone or
   * too slow to take the response changes nothing about that.
   */
  async #respond(
    transport: Handover["transport"],
    response: Response,
  ): Promise<void> {
    let body: Uint8Array;
    try {
      body = new Uint8Array(await response.arrayBuffer());
    } catch {
      body = new Uint8Array(0);
    }
    const status = response.status;
    const lines = [
      `HTTP/1.1 ${status} ${response.statusText || STATUS_TEXT[status] || ""}`,
    ];
    for (const [name, value] of response.headers) {
      // Framing is ours: the body is sent whole and the connection closed.
      if (
        name !== "content-length" && name !== "transfer-encoding" &&
        name !== "connection"
      ) lines.push(`${name}: ${value}`);
    }
    lines.push(`Content-Length: ${body.byteLength}`, "Connection: close");
    const head = new TextEncoder().encode(lines.join("\r\n") + "\r\n\r\n");
    const bytes = new Uint8Array(head.byteLength + body.byteLength);
    bytes.set(head);
    bytes.set(body, head.byteLength);
    try {
      await this.#write(transport, bytes);
    } catch {
      // Reset, closed or timed out: the connection is closed below anyway.
    }
    await lingeringClose(transport);
  }

  /**
   * Writes all of `bytes`, within `handshakeTimeout` if set. On expiry the
   * transport is closed (which also settles the stuck write, whose outcome is
   * then observed and dropped) and a `TimedOut` error is thrown.
   */
  async #write(
    transport: Handover["transport"],
    bytes: Uint8Array,
  ): Promise<void> {
    const writing = writeAll(transport, bytes);
    const timeout = this.#options.handshakeTimeout;
    if (timeout === undefined || timeout === 0) {
      try {
        return await writing;
      } catch (error) {
        closeQuietly(transport);
        throw error;
      }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<"expired">((resolve) => {
      timer = setTimeout(() => resolve("expired"), timeout);
    });
    try {
      if (await Promise.race([writing, expired]) === "expired") {
        writing.catch(() => {/* the timeout is the error reported */});
        throw new Deno.errors.TimedOut(
          `Cannot write the handshake response: it took longer than the handshake timeout of ${timeout} ms`,
        );
      }
    } catch (error) {
      closeQuietly(transport);
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * The default origin rule (gorilla's `checkSameOrigin`): a request without an
 * `Origin` header is allowed (it does not come from a browser); otherwise the
 * origin's host, with its port, must equal the request's `Host`, compared
 * case-insensitively. `Origin: null` and unparsable origins are refused.
 *
 * @param request The upgrade request.
 * @returns Whether the origin is allowed.
 *
 * @example Same-origin checks
 * ```ts title="Same-origin checks"
 * import assert from "node:assert/strict";
 * import { checkSameOrigin } from "@denows/websocket/upgrader";
 *
 * const request = (origin: string) =>
 *   new Request("http://example.com/", {
 *     headers: { host: "example.com:8080", origin },
 *   });
 * assert.equal(checkSameOrigin(request("https://EXAMPLE.com:8080")), true);
 * assert.equal(checkSameOrigin(request("https://example.com")), false);
 * assert.equal(checkSameOrigin(request("null")), false);
 * ```
 */
export function checkSameOrigin(request: Request): boolean {
  const origin = request.headers.get("origin");
  if (origin === null) return true;
  // The host is taken textually, as Go's url.Parse does: WHATWG URL parsing
  // would drop a default port ("http://a:80" -> "a") and break the comparison
  // with a Host header that carries it.
  const match = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/(?:[^@/?#]*@)?([^/?#]*)/.exec(
    origin,
  );
  if (match === null || match[1] === "" || !URL.canParse(origin)) return false;
  const host = request.headers.get("host") ?? new URL(request.url).host;
  return match[1].toLowerCase() === host.toLowerCase();
}

/**
 * Reports whether the client asked to upgrade to WebSocket: `Connection`
 * holds the `upgrade` token and `Upgrade` holds `websocket`, both
 * case-insensitively (gorilla's `IsWebSocketUpgrade`).
 *
 * @param request The HTTP request.
 * @returns Whether it is a WebSocket upgrade request.
 *
 * @example Routing upgrade requests
 * ```ts title="Routing upgrade requests"
 * import assert from "node:assert/strict";
 * import { isWebSocketUpgrade } from "@denows/websocket/upgrader";
 *
 * const upgrade = new Request("http://localhost/ws", {
 *   headers: { connection: "keep-alive, Upgrade", upgrade: "WebSocket" },
 * });
 * assert.equal(isWebSocketUpgrade(upgrade), true);
 * assert.equal(isWebSocketUpgrade(new Request("http://localhost/")), false);
 * ```
 */
export function isWebSocketUpgrade(request: Request): boolean {
  return headerHasToken(request.headers, "connection", "upgrade") &&
    headerHasToken(request.headers, "upgrade", "websocket");
}

/**
 * Returns the subprotocols the client requested in `Sec-WebSocket-Protocol`,
 * in its order of preference (gorilla's `Subprotocols`).
 *
 * @param request The HTTP request.
 * @returns The requested subprotocols; empty when none.
 *
 * @example Reading the requested subprotocols
 * ```ts title="Reading the requested subprotocols"
 * import assert from "node:assert/strict";
 * import { subprotocols } from "@denows/websocket/upgrader";
 *
 * const request = new Request("http://localhost/", {
 *   headers: { "sec-websocket-protocol": "v2.chat, v1.chat" },
 * });
 * assert.deepEqual(subprotocols(request), ["v2.chat", "v1.chat"]);
 * ```
 */
export function subprotocols(request: Request): string[] {
  return parseTokenList(request.headers.get("sec-websocket-protocol"));
}

/** Reports whether `value` has a function under each of `names`. */
function hasMethods(value: unknown, names: string[]): boolean {
  return typeof value === "object" && value !== null &&
    names.every((name) =>
      typeof (value as Record<string, unknown>)[name] === "function"
    );
}

/** What is wrong with a `head` option, if anything. */
function headProblem(head: unknown): string | undefined {
  return head === undefined || head instanceof Uint8Array
    ? undefined
    : "head must be a Uint8Array";
}

/** The first of the client's protocols the server supports, or "". */
function selectSubprotocol(
  supported: readonly string[],
  requested: string[],
): string {
  return requested.find((protocol) => supported.includes(protocol)) ?? "";
}

/**
 * gorilla's default error response: the reason phrase as a plain-text body,
 * plus `Sec-WebSocket-Version: 13` (RFC 6455 section 4.4). A HEAD request
 * gets the headers only.
 */
function defaultErrorResponse(
  error: HandshakeError,
  request: Request | null,
): Response {
  const text = STATUS_TEXT[error.status] ?? "Error";
  return withRequiredHeaders(
    new Response(request?.method === "HEAD" ? null : `${text}\n`, {
      status: error.status,
      statusText: text,
      headers: {
        "content-type": "text/plain; charset=utf-8",
        "x-content-type-options": "nosniff",
        "sec-websocket-version": "13",
      },
    }),
    error.status,
  );
}

/**
 * Adds the headers a status requires, whoever built the response: 426 names
 * the protocol to upgrade to (RFC 9110 section 15.5.22) and 405 the allowed
 * method (section 15.5.6).
 */
function withRequiredHeaders(response: Response, status: number): Response {
  const required = status === 426
    ? ["upgrade", "websocket"]
    : status === 405
    ? ["allow", "GET"]
    : undefined;
  if (required === undefined || response.headers.has(required[0])) {
    return response;
  }
  const headers = new Headers(response.headers);
  headers.set(required[0], required[1]);
  return new Response(response.body, {
    status: response.status,
    statusText: response.statusText,
    headers,
  });
}
