/**
 * The client side of the opening handshake (RFC 6455 section 4.1): a
 * {@linkcode Dialer} opens a `ws://` or `wss://` connection, optionally through
 * an HTTP CONNECT or SOCKS5 proxy, or a `ws+unix://` one over a Unix socket,
 * checks the server's 101 answer and returns a {@linkcode Conn} with the same
 * API as on the server side.
 *
 * @module
 */

import { type BufferPool, Conn } from "./conn.ts";
import {
  acceptDeflateResponse,
  DEFLATE_OFFER,
  DEFLATE_TAKEOVER_OFFER,
  type DeflateParameters,
} from "./deflate.ts";
import { TOKEN } from "./_http.ts";
import { closeQuietly, withContext, writeAll } from "./_io.ts";
import {
  checkConnSettings,
  type ConnSettings,
  withDefaultReadLimit,
} from "./_options.ts";
import { abortable, TimeoutSignal } from "./_deadline.ts";
import { readResponse, withErrorBody } from "./_response.ts";
import {
  addressOf,
  connectThroughHttpProxy,
  connectThroughSocks5,
  proxyFromEnvironment,
  proxyUrlOf,
  redact,
  unbracket,
} from "./_proxy.ts";

import {
  computeAcceptKey,
  generateKey,
  headerHasToken,
  parseTokenList,
} from "./_handshake.ts";

export { ProxyError, proxyFromEnvironment } from "./_proxy.ts";

/** Where a {@linkcode ConnectFunction} opens its TCP connection. */
export interface ConnectAddress {
  /** A host name or an IP literal (IPv6 without brackets). */
  hostname: string;
  /** The TCP port. */
  port: number;
}

/**
 * Opens the byte stream a handshake runs over (gorilla's `NetDial`, or
 * `NetDialTLSContext` as {@linkcode DialerOptions.connectTls}). It should
 * honour the signal: when it aborts, reject and leave nothing open (a
 * connection that arrives after the abort is closed).
 */
export type ConnectFunction = (
  address: ConnectAddress,
  options: { signal: AbortSignal },
) => Promise<Deno.Conn>;

/**
 * Chooses the proxy for a target URL (`ws:` or `wss:`): a proxy URL
 * (`http:`, `https:`, `socks5:` or `socks5h:`), or `null` / `undefined` to
 * connect directly.
 */
export type ProxyFunction = (
  target: URL,
) =>
  | URL
  | string
  | null
  | undefined
  | Promise<URL | string | null | undefined>;

/**
 * Supplies the cookies sent with a handshake and stores those the server
 * sets, like Go's `http.CookieJar`.
 */
export interface CookieJar {
  /**
   * Returns the cookies to send to `url`, each as `name=value`.
   *
   * @param url The WebSocket URL being dialed.
   * @returns The cookie pairs for the `Cookie` header.
   */
  getCookies(url: URL): string[] | Promise<string[]>;
  /**
   * Stores what the server's `Set-Cookie` headers said, for any answer
   * (successful or not).
   *
   * @param url The WebSocket URL that was dialed.
   * @param setCookieValues The raw `Set-Cookie` header values.
   */
  setCookies(url: URL, setCookieValues: string[]): void | Promise<void>;
}

/** Options for a {@linkcode Dialer}, gorilla's `Dialer` fields in camelCase. */
export interface DialerOptions {
  /**
   * Milliseconds the whole handshake (connect, proxy, TLS, response) may take;
   * `0` or absent for no limit.
   */
  handshakeTimeout?: number;
  /** Read buffer size of the connection in bytes (default 4096). */
  readBufferSize?: number;
  /** Write buffer size of the connection in bytes (default 4096). */
  writeBufferSize?: number;
  /** A pool the connection borrows its write buffer from while writing. */
  writeBufferPool?: BufferPool;
  /** Subprotocols to offer, in order of preference. */
  subprotocols?: string[];
  /**
   * Offers permessage-deflate (RFC 7692) with no context takeover in either
   * direction (default false). The server may decline; an answer we did not
   * ask for or cannot honour fails the handshake. {@linkcode Conn.compression}
   * tells whether the connection got it.
   */
  enableCompression?: boolean;
  /**
   * The level messages are compressed at, gorilla's -2 to 9 (1: fastest;
   * see `compressionLevel` of `ConnOptions`). Default: none, the
   * web-standard `CompressionStream`, which compresses as zlib's level 6.
   */
  compressionLevel?: number;
  /**
   * Use context takeover (RFC 7692 section 7.1.1) in each direction the
   * server does not refuse: the offer is {@linkcode DEFLATE_TAKEOVER_OFFER}.
   * The cost per direction: a 32 KiB window for the connection's life, and
   * the zlib state while messages flow (about 250 KiB to compress at 15
   * window bits, 20-40 KiB to inflate), freed after a second of idleness.
   * Default false.
   */
  contextTakeover?: boolean;
  /**
   * With compression, data messages shorter than this many bytes are sent
   * uncompressed (default 256; `0` compresses everything).
   */
  compressionThreshold?: number;
  /** Extra PEM root certificates trusted for `wss:` (and `https:` proxies). */
  caCerts?: string[];
  /**
   * The name the server's certificate must match, instead of the URL's host.
   */
  serverName?: string;
  /**
   * A PEM client certificate chain presented to a `wss:` server that asks
   * for one (mutual TLS); needs `key`. Deno can present one only on a TLS
   * connection it opens itself (`Deno.connectTls`), not over an existing
   * one (`Deno.startTls`). So the server's certificate must match the URL's
   * host, and a client certificate cannot be combined with `serverName`,
   * `connect` or `connectTls` (a TypeError here), nor with a proxy for a
   * `wss:` URL (a TypeError from the dial).
   */
  cert?: string;
  /** The PEM private key of `cert`. */
  key?: string;
  /**
   * Protocols offered through ALPN (RFC 7301) in the TLS handshake with a
   * `wss:` server; absent means no ALPN extension. The opening handshake is
   * an HTTP/1.1 request (RFC 6455 section 4.1), so the only protocol a
   * server may pick and still understand it is `"http/1.1"`; offer
   * `["http/1.1"]` for a server or load balancer that routes by ALPN or
   * would otherwise choose HTTP/2. `"h2"`, `"h2c"` and `"h3"` are refused
   * with a TypeError: a server that picks one expects HTTP/2 or HTTP/3
   * frames (and WebSocket over HTTP/2, RFC 8441, is not supported).
   */
  alpnProtocols?: string[];
  /**
   * Chooses a proxy per target; absent means no proxy. A `wss:` target
   * cannot go through an `https:` proxy (Deno cannot run TLS inside TLS):
   * such a dial throws a TypeError. `ws+unix:` URLs never use a proxy.
   */
  proxy?: ProxyFunction;
  /**
   * Opens the TCP connection, to the server or to the proxy; absent means
   * `Deno.connect`. For `wss:`, TLS then runs over it with `Deno.startTls`,
   * which needs a `Deno.TcpConn`. It may also ignore the address and open
   * some other stream, a Unix socket say, for a `ws:` URL whose host then
   * only fills the Host line (see the {@linkcode Dialer} examples).
   */
  connect?: ConnectFunction;
  /**
   * Opens the TLS connection to a `wss:` server dialed without a proxy
   * (gorilla's `NetDialTLSContext`), for TLS settings the dialer has no
   * option for. Its result is used as it is: the dialer runs no TLS of its
   * own on top, and `caCerts`, `serverName` and `alpnProtocols` do not apply
   * to it. If it is a `Deno.TlsConn`, the dialer waits for its handshake,
   * and refuses it when the server chose HTTP/2 or HTTP/3 through ALPN.
   * `connect` still opens `ws:` connections and every proxy connection;
   * through a proxy, TLS to a `wss:` server runs over the tunnel with
   * `Deno.startTls` and this function is not called, since it opens its own
   * connection and cannot take the tunnel.
   */
  connectTls?: ConnectFunction;
  /** Sends and stores cookies; absent means no cookies. */
  cookieJar?: CookieJar;
  /**
   * The largest message the server may send, in bytes: a larger one fails
   * the connection with 1009, and a compressed one is refused once its
   * inflated size passes the limit. Default 16 MiB; `0` lifts the limit.
   */
  readLimit?: number;
  /**
   * Keepalive: ping a server that has sent nothing for this many
   * milliseconds, and drop it when it stays silent `pongTimeout` longer
   * (see `pingInterval` of `ConnOptions`). Default 0: no keepalive.
   */
  pingInterval?: number;
  /** Milliseconds the server has to answer a keepalive ping (default: `pingInterval`). */
  pongTimeout?: number;
}

/** Options for one {@linkcode Dialer.prototype.dial} call. */
export interface DialOptions {
  /**
   * Extra request headers (`Origin`, `Authorization`, ...). `Host` replaces
   * the Host line; the handshake's own headers are refused.
   */
  headers?: HeadersInit;
  /** Aborts the handshake at any stage. */
  signal?: AbortSignal;
}

/** What a successful dial resolves to. */
export interface DialResult {
  /** The open WebSocket connection. */
  conn: Conn;
  /** The server's 101 response: status and headers, no body. */
  response: Response;
}

/**
 * The server answered the handshake, but not with a valid WebSocket upgrade
 * (gorilla's `ErrBadHandshake`). The answer is kept so callers can follow a
 * redirect, authenticate or show the server's message.
 *
 * @example Reading the server's refusal
 * ```ts title="BadHandshakeError"
 * import assert from "node:assert/strict";
 * import { BadHandshakeError, Dialer } from "@denows/websocket";
 *
 * const server = Deno.serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   () => new Response("go away", { status: 403 }),
 * );
 * const error = await new Dialer().dial(`ws://127.0.0.1:${server.addr.port}/`)
 *   .catch((e) => e);
 * assert.ok(error instanceof BadHandshakeError);
 * assert.equal(error.response.status, 403);
 * assert.equal(await error.response.text(), "go away");
 * await server.shutdown();
 * ```
 */
export class BadHandshakeError extends Error {
  /** The server's answer: status, headers and up to 1 KiB of body. */
  readonly response: Response;

  /**
   * Creates the error for a refused or invalid handshake answer.
   *
   * @param message What was wrong with the answer.
   * @param response The server's answer.
   * @param options The usual error options.
   */
  constructor(message: string, response: Response, options?: ErrorOptions) {
    super(message, options);
    this.name = "BadHandshakeError";
    this.response = response;
  }

  /** The HTTP status the server answered with. */
  get status(): number {
    return this.response.status;
  }
}

/** The handshake timeout of the module-level {@linkcode dial}. */
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 45_000;

/**
 * Request headers the handshake writes itself (RFC 6455 section 4.1); the
 * application may not send its own. `Sec-WebSocket-Protocol` is only refused
 * when the dialer offers subprotocols.
 */
const HANDSHAKE_HEADERS = [
  "upgrade",
  "connection",
  "sec-websocket-key",
  "sec-websocket-version",
  "sec-websocket-extensions",
];

const encoder = new TextEncoder();

/**
 * Opens client WebSocket connections (gorilla's `Dialer`). One dialer can
 * dial many times, also concurrently.
 *
 * @example Echo through a Deno.serve server
 * ```ts title="Dialer"
 * import assert from "node:assert/strict";
 * import { Dialer, MESSAGE_TYPE } from "@denows/websocket";
 *
 * const server = Deno.serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   (request) => {
 *     const { socket, response } = Deno.upgradeWebSocket(request, {
 *       protocol: "chat",
 *     });
 *     socket.onmessage = (event) => socket.send(event.data);
 *     return response;
 *   },
 * );
 * const dialer = new Dialer({ subprotocols: ["chat"], handshakeTimeout: 5000 });
 * const { conn, response } = await dialer.dial(
 *   `ws://127.0.0.1:${server.addr.port}/`,
 * );
 * assert.equal(response.status, 101);
 * assert.equal(conn.subprotocol, "chat");
 * await conn.writeMessage(MESSAGE_TYPE.Text, "hello");
 * const message = await conn.readMessage();
 * assert.equal(new TextDecoder().decode(message.data), "hello");
 * await conn.closeGracefully(1000, "bye", { timeout: 1000 });
 * await server.shutdown();
 * ```
 *
 * @example Dialing a Unix socket, by URL or with connect
 * ```ts title="Unix sockets"
 * import assert from "node:assert/strict";
 * import { Dialer } from "@denows/websocket";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.remove(path);
 * const server = Deno.serve({ path, onListen() {} }, (request) => {
 *   const { socket, response } = Deno.upgradeWebSocket(request);
 *   socket.onopen = () => socket.send(new URL(request.url).pathname);
 *   return response;
 * });
 *
 * // The ws (npm) convention: the socket path, a colon, the request path.
 * const byUrl = await new Dialer().dial(`ws+unix://${path}:/chat`);
 * const first = await byUrl.conn.readMessage();
 * assert.equal(new TextDecoder().decode(first.data), "/chat");
 * await byUrl.conn.closeGracefully(1000, "", { timeout: 1000 });
 *
 * // Or a connect that opens the socket: the URL's host fills the Host line.
 * const unix = new Dialer({
 *   connect: () => Deno.connect({ transport: "unix", path }),
 * });
 * const byConnect = await unix.dial("ws://localhost/news");
 * const second = await byConnect.conn.readMessage();
 * assert.equal(new TextDecoder().decode(second.data), "/news");
 * await byConnect.conn.closeGracefully(1000, "", { timeout: 1000 });
 * await server.shutdown(); // which removes the socket file
 * ```
 */
export class Dialer {
  #handshakeTimeout: number;
  #readBufferSize: number | undefined;
  #writeBufferSize: number | undefined;
  #writeBufferPool: BufferPool | undefined;
  #enableCompression: boolean;
  #compressionThreshold: number | undefined;
  #connSettings: ConnSettings;
  #contextTakeover: boolean;
  #subprotocols: string[];
  #caCerts: string[] | undefined;
  #serverName: string | undefined;
  #proxy: ProxyFunction | undefined;
  #connect: ConnectFunction;
  #connectTls: ConnectFunction | undefined;
  #clientCertificate: boolean;
  #alpnProtocols: string[] | undefined;
  #cookieJar: CookieJar | undefined;

  /**
   * Creates a dialer. The options are checked here, so a mistake shows at
   * construction rather than at the first dial.
   *
   * @param options The dialer's settings.
   * @throws {RangeError} When a timeout or buffer size is negative or not a
   * number, the compression threshold or the read limit is not a
   * non-negative integer, or a keepalive time is not a valid number of
   * milliseconds.
   * @throws {TypeError} When a subprotocol is not a token or repeats, an
   * ALPN protocol is not acceptable, `connect` or `connectTls` is not a
   * function, or a client certificate comes without its key (or the other
   * way round) or with an option it cannot be used with.
   */
  constructor(options: DialerOptions = {}) {
    checkConnSettings("Cannot create the dialer", options);
    this.#connSettings = withDefaultReadLimit(options);
    this.#handshakeTimeout = checkSize(
      "handshakeTimeout",
      options.handshakeTimeout,
    ) ?? 0;
    this.#readBufferSize = checkSize("readBufferSize", options.readBufferSize);
    this.#writeBufferSize = checkSize(
      "writeBufferSize",
      options.writeBufferSize,
    );
    this.#writeBufferPool = options.writeBufferPool;
    this.#subprotocols = checkSubprotocols(options.subprotocols ?? []);
    this.#caCerts = options.caCerts;
    this.#serverName = options.serverName;
    this.#proxy = options.proxy;
    this.#connect = checkFunction("connect", options.connect) ?? connectTcp;
    this.#alpnProtocols = checkAlpnProtocols(options.alpnProtocols);
    this.#clientCertificate = checkClientCertificate(options);
    this.#connectTls = checkFunction("connectTls", options.connectTls) ??
      (this.#clientCertificate
        ? connectTlsWith({
          caCerts: this.#caCerts,
          alpnProtocols: this.#alpnProtocols,
          cert: options.cert!,
          key: options.key!,
        })
        : undefined);
    this.#cookieJar = options.cookieJar;
    this.#enableCompression = options.enableCompression === true;
    this.#contextTakeover = options.contextTakeover === true;
    const threshold = options.compressionThreshold;
    if (
      threshold !== undefined &&
      (!Number.isSafeInteger(threshold) || threshold < 0)
    ) {
      throw new RangeError(
        `Cannot create the dialer: compressionThreshold must be a non-negative integer, got ${threshold}`,
      );
    }
    this.#compressionThreshold = threshold;
  }

  /**
   * Opens a WebSocket connection to `url` (gorilla's `DialContext`).
   *
   * A `ws+unix:` URL (the convention of npm's `ws`) dials a Unix socket:
   * `ws+unix:///path/to/socket:/request/path?query` connects to
   * `/path/to/socket` with `Deno.connect({ transport: "unix", path })` (not
   * `connect`, which opens TCP) and asks for `/request/path?query` (`/` when
   * nothing follows the socket path) with the Host line `localhost`. The
   * socket path is percent-decoded and ends at its first `:`.
   *
   * @param url A `ws:`, `wss:` or `ws+unix:` URL without user info.
   * @param options Extra headers and an abort signal.
   * @returns The connection and the server's 101 response.
   * @throws {TypeError} When the URL is not `ws:` / `wss:` / `ws+unix:`,
   * holds user info, or a header clashes with the handshake's own.
   * @throws {BadHandshakeError} When the server answers anything but a valid
   * upgrade (a wrong status, accept key, subprotocol or extension).
   * @throws {ProxyError} When the proxy refuses the tunnel.
   * @throws {Deno.errors.TimedOut} When the handshake timeout passes (an
   * aborted signal rejects with its reason instead).
   */
  async dial(
    url: string | URL,
    options: DialOptions = {},
  ): Promise<DialResult> {
    const target = parseWebSocketUrl(url);
    const key = generateKey();
    const { hostLine, headers, offered } = this.#prepareHeaders(
      options.headers,
    );
    const deadline = new TimeoutSignal(
      this.#handshakeTimeout,
      options.signal,
      `Cannot open the WebSocket connection: the handshake timed out after ${this.#handshakeTimeout} ms`,
    );
    const { signal } = deadline;
    // Every stage waits on the transport held here: aborting closes it, which
    // rejects whatever read, write or TLS handshake is pending on it.
    let transport: Deno.Conn | undefined;
    const closeOnAbort = () => closeQuietly(transport);
    signal.addEventListener("abort", closeOnAbort, { once: true });
    try {
      signal.throwIfAborted();
      const cookies = this.#cookieJar === undefined ? [] : await abortable(
        Promise.resolve(this.#cookieJar.getCookies(new URL(target.url))),
        signal,
      );
      const request = formatRequest(target.path, {
        hostLine: hostLine ?? target.host,
        key,
        offered,
        extensions: this.#extensionOffer(),
        cookies,
        headers,
      });
      transport = await this.#openStream(target, signal, (conn) => {
        transport = conn;
        // An abort that landed between a stage's end and this call found
        // nothing to close.
        if (signal.aborted) closeQuietly(conn);
      });
      await writeAll(transport, request);
      const { response, rest } = await readResponse(transport, "handshake");
      if (this.#cookieJar !== undefined) {
        const setCookies = response.headers.getSetCookie();
        if (setCookies.length > 0) {
          await abortable(
            Promise.resolve(
              this.#cookieJar.setCookies(new URL(target.url), setCookies),
            ),
            signal,
          );
        }
      }
      const problem = await checkResponse(response, key, offered);
      if (problem !== undefined) {
        throw new BadHandshakeError(
          `Cannot open the WebSocket connection: ${problem}`,
          await withErrorBody(response, transport, rest, signal),
        );
      }
      const compression = this.#acceptExtensions(response);
      const conn = new Conn(transport, {
        role: "client",
        subprotocol: response.headers.get("sec-websocket-protocol") ?? "",
        head: rest,
        readBufferSize: this.#readBufferSize,
        writeBufferSize: this.#writeBufferSize,
        writeBufferPool: this.#writeBufferPool,
        compression,
        compressionThreshold: this.#compressionThreshold,
        ...this.#connSettings,
      });
      transport = undefined; // the Conn owns it now
      return { conn, response };
    } catch (error) {
      closeQuietly(transport);
      // An abort surfaces as whatever the closed transport reported; the
      // caller wants the reason instead.
      if (signal.aborted) throw signal.reason;
      throw error;
    } finally {
      signal.removeEventListener("abort", closeOnAbort);
      deadline.clear();
    }
  }

  /**
   * Checks the application's headers against the handshake's own and pulls
   * out the Host override and any subprotocols offered through a header.
   */
  #prepareHeaders(init: HeadersInit | undefined): {
    hostLine: string | undefined;
    headers: [string, string][];
    offered: string[];
  } {
    const given = new Headers(init);
    let hostLine: string | undefined;
    let offered = this.#subprotocols;
    const headers: [string, string][] = [];
    for (const [name, value] of given) {
      if (
        HANDSHAKE_HEADERS.includes(name) ||
        (name === "sec-websocket-protocol" && this.#subprotocols.length > 0)
      ) {
        throw new TypeError(
          `Cannot send the header ${
            canonicalName(name)
          }: the handshake sets it itself`,
        );
      }
      if (name === "host") {
        hostLine = value;
      } else {
        if (name === "sec-websocket-protocol") {
          // gorilla lets the subprotocols come in through the header when
          // the Dialer has none; the answer is checked against them alike.
          offered = checkSubprotocols(parseTokenList(value));
        }
        headers.push([canonicalName(name), value]);
      }
    }
    if (hostLine === "") {
      throw new TypeError("Cannot send an empty Host header");
    }
    return { hostLine, headers, offered };
  }

  /** The `Sec-WebSocket-Extensions` offer, or undefined for none. */
  #extensionOffer(): string | undefined {
    if (!this.#enableCompression) return undefined;
    return this.#contextTakeover ? DEFLATE_TAKEOVER_OFFER : DEFLATE_OFFER;
  }

  /**
   * Checks the server's `Sec-WebSocket-Extensions` against the offer and
   * returns the negotiated permessage-deflate parameters, if any. RFC 6455
   * section 4.1: an extension that was not requested (or an answer we cannot
   * honour, RFC 7692 section 5) fails the connection.
   */
  #acceptExtensions(response: Response): DeflateParameters | undefined {
    const answer = response.headers.get("sec-websocket-extensions");
    if (!this.#enableCompression) {
      const extensions = parseTokenList(answer);
      if (extensions.length === 0) return undefined;
      throw new BadHandshakeError(
        `Cannot open the WebSocket connection: the server chose the extension ${
          JSON.stringify(extensions[0])
        }, which was not offered`,
        response,
      );
    }
    try {
      return acceptDeflateResponse(answer, {
        contextTakeover: this.#contextTakeover,
      });
    } catch (error) {
      const reason = (error as Error).message;
      throw new BadHandshakeError(
        `Cannot open the WebSocket connection: ${
          reason[0].toLowerCase() + reason.slice(1)
        }`,
        response,
        { cause: error },
      );
    }
  }

  /**
   * Opens the byte stream to the server: a Unix socket, or TCP, through the
   * proxy if there is one, then TLS for `wss:` (or `connectTls` at once).
   * `hold` is told of every connection as soon as it exists, so an abort can
   * close it at any stage.
   */
  async #openStream(
    target: Target,
    signal: AbortSignal,
    hold: (conn: Deno.Conn) => void,
  ): Promise<Deno.Conn> {
    const { url } = target;
    // No query: it may carry a token, and errors end up in logs.
    const dialing = `Cannot dial ${url.protocol}//${url.host}${url.pathname}`;
    if (target.socketPath !== undefined) {
      const path = target.socketPath;
      const conn = await this.#open(
        () => Deno.connect({ transport: "unix", path }),
        signal,
        dialing,
      );
      hold(conn);
      return conn;
    }
    const proxy = await this.#proxyFor(url, signal);
    const address = addressOf(url);
    const secure = url.protocol === "wss:";
    let conn: Deno.Conn;
    if (proxy === null) {
      const connectTls = secure ? this.#connectTls : undefined;
      conn = await this.#open(
        () => (connectTls ?? this.#connect)(address, { signal }),
        signal,
        dialing,
      );
      hold(conn);
      if (connectTls !== undefined) {
        try {
          await checkTls(conn);
        } catch (error) {
          throw withContext(error, `${dialing}: the TLS handshake failed`);
        }
        return conn;
      }
    } else {
      if (proxy.protocol === "https:" && secure) {
        throw new TypeError(
          "Cannot dial a wss: URL through an https: proxy: Deno cannot run TLS inside a TLS connection",
        );
      }
      if (this.#clientCertificate && secure) {
        throw new TypeError(
          "Cannot dial a wss: URL through a proxy with a client certificate: Deno.startTls cannot present one",
        );
      }
      conn = await this.#open(
        () => this.#connect(addressOf(proxy), { signal }),
        signal,
        `${dialing} through the proxy ${redact(proxy)}`,
      );
      hold(conn);
      if (proxy.protocol === "https:") {
        conn = await startTls(conn, unbracket(proxy.hostname), {
          caCerts: this.#caCerts,
          signal,
          hold,
        });
      }
      if (proxy.protocol === "http:" || proxy.protocol === "https:") {
        await connectThroughHttpProxy(conn, proxy, address, signal);
      } else {
        await connectThroughSocks5(conn, proxy, address);
      }
    }
    if (secure) {
      try {
        conn = await startTls(
          conn,
          this.#serverName ?? unbracket(url.hostname),
          {
            caCerts: this.#caCerts,
            alpnProtocols: this.#alpnProtocols,
            signal,
            hold,
          },
        );
      } catch (error) {
        throw withContext(error, `${dialing}: the TLS handshake failed`);
      }
    }
    return conn;
  }

  /** Asks the proxy function for the proxy of `target`. */
  async #proxyFor(target: URL, signal: AbortSignal): Promise<URL | null> {
    if (this.#proxy === undefined) return null;
    const chosen = await abortable(
      Promise.resolve(this.#proxy(new URL(target))),
      signal,
    );
    if (chosen === null || chosen === undefined) return null;
    return proxyUrlOf(chosen);
  }

  /** Opens a connection, closing it if it arrives after an abort. */
  async #open(
    connect: () => Promise<Deno.Conn>,
    signal: AbortSignal,
    context: string,
  ): Promise<Deno.Conn> {
    const connecting = connect().then((conn) => {
      if (signal.aborted) closeQuietly(conn);
      return conn;
    });
    try {
      return await abortable(connecting, signal);
    } catch (error) {
      throw withContext(error, context);
    }
  }
}

const defaultDialer = new Dialer({
  proxy: proxyFromEnvironment,
  handshakeTimeout: DEFAULT_HANDSHAKE_TIMEOUT_MS,
});

/**
 * Opens a WebSocket connection with the default dialer: proxies from
 * `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY` (see
 * {@linkcode proxyFromEnvironment}) and a 45 s handshake timeout.
 *
 * @param url A `ws:`, `wss:` or `ws+unix:` URL without user info.
 * @param options Extra headers and an abort signal.
 * @returns The connection and the server's 101 response.
 * @throws {TypeError} When the URL or a header is not acceptable.
 * @throws {BadHandshakeError} When the server does not upgrade.
 * @throws {ProxyError} When the proxy refuses the tunnel.
 *
 * @example Dialing a Deno.serve server
 * ```ts title="dial()"
 * import assert from "node:assert/strict";
 * import { dial } from "@denows/websocket";
 *
 * const server = Deno.serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   (request) => {
 *     const { socket, response } = Deno.upgradeWebSocket(request);
 *     socket.onopen = () => socket.send("welcome");
 *     return response;
 *   },
 * );
 * const { conn } = await dial(`ws://127.0.0.1:${server.addr.port}/`);
 * const message = await conn.readMessage();
 * assert.equal(new TextDecoder().decode(message.data), "welcome");
 * await conn.closeGracefully(1000, "", { timeout: 1000 });
 * await server.shutdown();
 * ```
 */
export function dial(
  url: string | URL,
  options?: DialOptions,
): Promise<DialResult> {
  return defaultDialer.dial(url, options);
}

// ---------------------------------------------------------------------------
// URLs and addresses

/** What a dial is aimed at, worked out from its URL. */
interface Target {
  url: URL;
  /** The request-target of the GET line, in origin-form (RFC 9112 section 3.2.1). */
  path: string;
  /** The Host line, unless a Host header replaces it. */
  host: string;
  /** The Unix socket of a `ws+unix:` URL. */
  socketPath?: string;
}

/**
 * Parses and checks a WebSocket URL (RFC 6455 section 3), or a `ws+unix:`
 * one, whose path is the socket path, a colon and the request path.
 */
function parseWebSocketUrl(url: string | URL): Target {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (cause) {
    throw new TypeError(
      `Cannot dial ${JSON.stringify(String(url))}: it is not a valid URL`,
      { cause },
    );
  }
  const cannotDial = `Cannot dial ${JSON.stringify(redact(parsed))}`;
  if (
    parsed.protocol !== "ws:" && parsed.protocol !== "wss:" &&
    parsed.protocol !== "ws+unix:"
  ) {
    throw new TypeError(
      `${cannotDial}: the scheme must be ws:, wss: or ws+unix:, not ${parsed.protocol}`,
    );
  }
  if (parsed.username !== "" || parsed.password !== "") {
    throw new TypeError(
      `${cannotDial}: user info is not allowed in a WebSocket URL`,
    );
  }
  if (parsed.protocol === "ws+unix:") return unixTarget(parsed, cannotDial);
  if (parsed.hostname === "") {
    throw new TypeError(`Cannot dial ${JSON.stringify(String(url))}: no host`);
  }
  return {
    url: parsed,
    path: `${parsed.pathname}${parsed.search}`,
    host: parsed.host,
  };
}

/** The target of a `ws+unix:` URL (see {@linkcode Dialer.prototype.dial}). */
function unixTarget(url: URL, cannotDial: string): Target {
  if (url.host !== "") {
    throw new TypeError(
      `${cannotDial}: a ws+unix: URL has no host, the socket path follows the scheme (ws+unix:///path/to/socket:/request/path)`,
    );
  }
  const colon = url.pathname.indexOf(":");
  const encoded = colon < 0 ? url.pathname : url.pathname.slice(0, colon);
  const path = colon < 0 ? "/" : url.pathname.slice(colon + 1) || "/";
  if (!path.startsWith("/")) {
    throw new TypeError(
      `${cannotDial}: the request path after the socket path must start with /`,
    );
  }
  let socketPath: string;
  try {
    socketPath = decodeURIComponent(encoded);
  } catch (cause) {
    throw new TypeError(`${cannotDial}: the socket path is badly encoded`, {
      cause,
    });
  }
  if (socketPath === "" || socketPath === "/") {
    throw new TypeError(`${cannotDial}: no socket path`);
  }
  // ws (npm) sends this Host line too: HTTP/1.1 requires one (RFC 9112
  // section 3.2), and a socket has no name to put in it.
  return { url, path: `${path}${url.search}`, host: "localhost", socketPath };
}

function connectTcp(
  address: ConnectAddress,
  options: { signal: AbortSignal },
): Promise<Deno.Conn> {
  return Deno.connect({ ...address, signal: options.signal });
}

// ---------------------------------------------------------------------------
// Options

function checkFunction(
  name: string,
  value: ConnectFunction | undefined,
): ConnectFunction | undefined {
  if (value !== undefined && typeof value !== "function") {
    throw new TypeError(
      `Cannot create the dialer: ${name} must be a function, got ${typeof value}`,
    );
  }
  return value;
}

/**
 * Protocol names that carry HTTP/2 or HTTP/3 (RFC 9113 section 3.1, RFC
 * 9114 section 3.1): a server that picks one does not read the HTTP/1.1
 * handshake request.
 */
const NOT_HTTP_1_1 = new Set(["h2", "h2c", "h3"]);

/** ALPN protocol names: 1 to 255 bytes each (RFC 7301 section 3.1), once each. */
function checkAlpnProtocols(
  protocols: string[] | undefined,
): string[] | undefined {
  if (protocols === undefined) return undefined;
  if (!Array.isArray(protocols)) {
    throw new TypeError(
      "Cannot create the dialer: alpnProtocols must be an array of strings",
    );
  }
  const seen = new Set<string>();
  for (const protocol of protocols) {
    const offer = `Cannot offer the ALPN protocol ${JSON.stringify(protocol)}`;
    if (typeof protocol !== "string") {
      throw new TypeError(`${offer}: it is not a string`);
    }
    const length = encoder.encode(protocol).length;
    if (length === 0 || length > 255) {
      throw new TypeError(`${offer}: a name takes 1 to 255 bytes`);
    }
    if (NOT_HTTP_1_1.has(protocol)) {
      throw new TypeError(
        `${offer}: the WebSocket handshake is an HTTP/1.1 request (RFC 6455 section 4.1), offer "http/1.1"`,
      );
    }
    if (seen.has(protocol)) throw new TypeError(`${offer} twice`);
    seen.add(protocol);
  }
  return [...protocols];
}

/**
 * Checks the client certificate options; true when there is a certificate.
 * Only `Deno.connectTls` can present one, which rules out what needs
 * `Deno.startTls` or opens the TLS connection some other way.
 */
function checkClientCertificate(options: DialerOptions): boolean {
  const { cert, key } = options;
  if (cert === undefined && key === undefined) return false;
  const problem = cert === undefined
    ? "key needs cert"
    : key === undefined
    ? "cert needs key"
    : typeof cert !== "string" || typeof key !== "string"
    ? "cert and key must be PEM strings"
    : options.connectTls !== undefined
    ? "cert and key cannot be used with connectTls, which opens the TLS connection itself: present the certificate there"
    : options.connect !== undefined
    ? "cert and key cannot be used with connect: Deno.startTls cannot present a client certificate over its connection, use connectTls"
    : options.serverName !== undefined
    ? "cert and key cannot be used with serverName: Deno.connectTls verifies the name it connects to"
    : undefined;
  if (problem !== undefined) {
    throw new TypeError(`Cannot create the dialer: ${problem}`);
  }
  return true;
}

function checkSize(name: string, value: number | undefined) {
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !(value >= 0) || value === Infinity) {
    throw new RangeError(
      `Cannot create the dialer: ${name} must be a non-negative number, got ${value}`,
    );
  }
  return value;
}

/** Subprotocols are tokens and offered once each (RFC 6455 section 4.1). */
function checkSubprotocols(subprotocols: string[]): string[] {
  const seen = new Set<string>();
  for (const protocol of subprotocols) {
    if (typeof protocol !== "string" || !TOKEN.test(protocol)) {
      throw new TypeError(
        `Cannot offer the subprotocol ${
          JSON.stringify(protocol)
        }: it is not an HTTP token`,
      );
    }
    if (seen.has(protocol)) {
      throw new TypeError(
        `Cannot offer the subprotocol ${JSON.stringify(protocol)} twice`,
      );
    }
    seen.add(protocol);
  }
  return [...subprotocols];
}

/** `sec-websocket-key` → `Sec-Websocket-Key`, as Go writes header names. */
function canonicalName(name: string): string {
  return name.replace(/(^|-)([a-z])/g, (_, dash, c) => dash + c.toUpperCase());
}

// ---------------------------------------------------------------------------
// Wire I/O

interface RequestParts {
  hostLine: string;
  key: string;
  offered: string[];
  extensions: string | undefined;
  cookies: string[];
  headers: [string, string][];
}

/**
 * The opening handshake request (RFC 6455 section 4.1), with the header
 * names capitalised as in the RFC's examples: some servers depend on it.
 */
function formatRequest(path: string, parts: RequestParts): Uint8Array {
  const lines = [
    `GET ${path} HTTP/1.1`,
    `Host: ${parts.hostLine}`,
    "Upgrade: websocket",
    "Connection: Upgrade",
    `Sec-WebSocket-Key: ${parts.key}`,
    "Sec-WebSocket-Version: 13",
  ];
  let headers = parts.headers;
  if (parts.offered.length > 0) {
    lines.push(`Sec-WebSocket-Protocol: ${parts.offered.join(", ")}`);
    headers = headers.filter(([name]) => name !== "Sec-Websocket-Protocol");
  }
  if (parts.extensions !== undefined) {
    lines.push(`Sec-WebSocket-Extensions: ${parts.extensions}`);
  }
  const cookie = headers.find(([name]) => name === "Cookie");
  if (parts.cookies.length > 0) {
    // The jar's cookies come first; the application's own Cookie header is
    // kept behind them in the same line (RFC 6265 section 5.4: one line).
    const values = [...parts.cookies];
    if (cookie !== undefined) values.push(cookie[1]);
    const line = new Headers({ cookie: values.join("; ") }).get("cookie");
    lines.push(`Cookie: ${line}`);
    headers = headers.filter(([name]) => name !== "Cookie");
  }
  for (const [name, value] of headers) lines.push(`${name}: ${value}`);
  return encoder.encode(lines.join("\r\n") + "\r\n\r\n");
}

/**
 * Why the response is not a valid upgrade for our request (RFC 6455 section
 * 4.1, the client's checks), or undefined when it is.
 */
async function checkResponse(
  response: Response,
  key: string,
  offered: string[],
): Promise<string | undefined> {
  const { status, headers } = response;
  if (status !== 101) {
    return `the server answered ${status}${
      response.statusText ? ` ${response.statusText}` : ""
    } instead of 101 Switching Protocols`;
  }
  if (!headerHasToken(headers, "upgrade", "websocket")) {
    return `the response's Upgrade header is ${
      describe(headers.get("upgrade"))
    }, not "websocket"`;
  }
  if (!headerHasToken(headers, "connection", "upgrade")) {
    return `the response's Connection header is ${
      describe(headers.get("connection"))
    }, not "Upgrade"`;
  }
  const accept = headers.get("sec-websocket-accept");
  if (accept !== await computeAcceptKey(key)) {
    return `the response's Sec-WebSocket-Accept is ${
      describe(accept)
    }, which does not match the key sent`;
  }
  const protocol = headers.get("sec-websocket-protocol");
  if (protocol !== null && !offered.includes(protocol)) {
    const chose = `the server chose the subprotocol ${describe(protocol)}`;
    return offered.length === 0
      ? `${chose} although none was offered`
      : `${chose}, which is not one of ${offered.join(", ")}`;
  }
  return undefined;
}

function describe(value: string | null): string {
  return value === null ? "missing" : JSON.stringify(value);
}

// ---------------------------------------------------------------------------
// TLS

interface StartTlsOptions {
  caCerts: string[] | undefined;
  alpnProtocols?: string[];
  signal: AbortSignal;
  /** Hands the TLS connection to the caller as soon as it exists. */
  hold(conn: Deno.Conn): void;
}

/**
 * Runs a TLS handshake over `conn`, verifying the certificate against
 * `hostname`. Deno.startTls needs a TCP connection: a custom connect function
 * returning anything else (or a TLS connection) cannot carry `wss:`.
 */
async function startTls(
  conn: Deno.Conn,
  hostname: string,
  options: StartTlsOptions,
): Promise<Deno.TlsConn> {
  let tls: Deno.TlsConn;
  try {
    tls = await Deno.startTls(conn as Deno.TcpConn, {
      hostname,
      caCerts: options.caCerts,
      alpnProtocols: options.alpnProtocols,
    });
  } catch (cause) {
    if (options.signal.aborted) throw cause;
    throw new TypeError(
      "Cannot start TLS: the connection is not a plain TCP connection (open TLS some other way with connectTls)",
      { cause },
    );
  }
  options.hold(tls);
  options.signal.throwIfAborted();
  await checkTls(tls);
  return tls;
}

/**
 * Completes the TLS handshake of a `Deno.TlsConn` (anything else is taken
 * as it is) and refuses an ALPN answer that is not HTTP/1.1, which would
 * fail later as a garbled answer to the handshake request.
 */
async function checkTls(conn: Deno.Conn): Promise<void> {
  if (!("handshake" in conn) || typeof conn.handshake !== "function") return;
  const { alpnProtocol } = await (conn as Deno.TlsConn).handshake();
  if (alpnProtocol !== null && NOT_HTTP_1_1.has(alpnProtocol)) {
    throw new TypeError(
      `Cannot open the WebSocket connection: the server chose the ALPN protocol ${
        JSON.stringify(alpnProtocol)
      }, but the handshake is an HTTP/1.1 request (RFC 6455 section 4.1)`,
    );
  }
}

/** Opens TLS with `Deno.connectTls`, the one way to present a client certificate. */
function connectTlsWith(
  options: Omit<Deno.ConnectTlsOptions, "port"> & Deno.TlsCertifiedKeyPem,
): ConnectFunction {
  return (address) => Deno.connectTls({ ...options, ...address });
}
