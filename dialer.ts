/**
 * The client side of the opening handshake (RFC 6455 section 4.1): a
 * {@linkcode Dialer} opens a `ws://` or `wss://` connection, optionally through
 * an HTTP CONNECT or SOCKS5 proxy, checks the server's 101 answer and returns
 * a {@linkcode Conn} with the same API as on the server side.
 *
 * @module
 */

import { type BufferPool, Conn } from "./conn.ts";
import {
  acceptDeflateResponse,
  DEFLATE_OFFER,
  type DeflateParameters,
} from "./deflate.ts";
import { HttpError, parseResponseHead, readHead, TOKEN } from "./_http.ts";
import { closeQuietly, writeAll } from "./_io.ts";
import {
  computeAcceptKey,
  encodeBase64,
  generateKey,
  headerHasToken,
  parseTokenList,
} from "./_handshake.ts";

/** Where a {@linkcode ConnectFunction} opens its TCP connection. */
export interface ConnectAddress {
  /** A host name or an IP literal (IPv6 without brackets). */
  hostname: string;
  /** The TCP port. */
  port: number;
}

/**
 * Opens the byte stream a handshake runs over (gorilla's `NetDial`). It must
 * honour the signal: when it aborts, reject and leave nothing open.
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
   * tells whether the connection got it. There is no compression level: the
   * web-standard `CompressionStream` has none.
   */
  enableCompression?: boolean;
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
   * Chooses a proxy per target; absent means no proxy. A `wss:` target
   * cannot go through an `https:` proxy (Deno cannot run TLS inside TLS):
   * such a dial throws a TypeError.
   */
  proxy?: ProxyFunction;
  /** Opens the TCP connection; absent means `Deno.connect`. */
  connect?: ConnectFunction;
  /** Sends and stores cookies; absent means no cookies. */
  cookieJar?: CookieJar;
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
 * import { BadHandshakeError, Dialer } from "./dialer.ts";
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

/**
 * A proxy refused to open the tunnel. For an HTTP proxy `status` is its HTTP
 * status (407 when it wants credentials) and `response` its answer; for a
 * SOCKS5 proxy `status` is the SOCKS reply code and `response` is absent.
 *
 * @example Reading a proxy's refusal
 * ```ts title="ProxyError"
 * import assert from "node:assert/strict";
 * import { Dialer, ProxyError } from "./dialer.ts";
 *
 * const proxy = Deno.serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   () => new Response(null, { status: 407 }),
 * );
 * const dialer = new Dialer({
 *   proxy: () => `http://127.0.0.1:${proxy.addr.port}`,
 * });
 * const error = await dialer.dial("ws://example.com/").catch((e) => e);
 * assert.ok(error instanceof ProxyError);
 * assert.equal(error.status, 407);
 * await proxy.shutdown();
 * ```
 */
export class ProxyError extends Error {
  /** The proxy's HTTP status, or the SOCKS5 reply code. */
  readonly status: number;
  /** The HTTP proxy's answer (up to 1 KiB of body); absent for SOCKS5. */
  readonly response: Response | undefined;

  /**
   * Creates the error for a proxy's refusal.
   *
   * @param message What the proxy refused.
   * @param status The proxy's HTTP status or SOCKS5 reply code.
   * @param response The HTTP proxy's answer, if any.
   * @param options The usual error options.
   */
  constructor(
    message: string,
    status: number,
    response?: Response,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "ProxyError";
    this.status = status;
    this.response = response;
  }
}

/** Most bytes a response head (handshake or proxy) may take. */
const MAX_RESPONSE_HEAD_BYTES = 64 * 1024;
/** Most body bytes kept from a refusal, as gorilla does. */
const MAX_ERROR_BODY_BYTES = 1024;
/**
 * How long a refusal's body is waited for after its head: a server may keep
 * the connection open without saying how long the body is.
 */
const ERROR_BODY_WAIT_MS = 1000;
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
const decoder = new TextDecoder();

/**
 * Opens client WebSocket connections (gorilla's `Dialer`). One dialer can
 * dial many times, also concurrently.
 *
 * @example Echo through a Deno.serve server
 * ```ts title="Dialer"
 * import assert from "node:assert/strict";
 * import { Dialer } from "./dialer.ts";
 * import { MESSAGE_TYPE } from "./frame.ts";
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
 */
export class Dialer {
  #handshakeTimeout: number;
  #readBufferSize: number | undefined;
  #writeBufferSize: number | undefined;
  #writeBufferPool: BufferPool | undefined;
  #enableCompression: boolean;
  #compressionThreshold: number | undefined;
  #subprotocols: string[];
  #caCerts: string[] | undefined;
  #serverName: string | undefined;
  #proxy: ProxyFunction | undefined;
  #connect: ConnectFunction;
  #cookieJar: CookieJar | undefined;

  /**
   * Creates a dialer. The options are checked here, so a mistake shows at
   * construction rather than at the first dial.
   *
   * @param options The dialer's settings.
   * @throws {RangeError} When a timeout or buffer size is negative or not a
   * number, or the compression threshold is not a non-negative integer.
   * @throws {TypeError} When a subprotocol is not a token or repeats.
   */
  constructor(options: DialerOptions = {}) {
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
    this.#connect = options.connect ?? connectTcp;
    this.#cookieJar = options.cookieJar;
    this.#enableCompression = options.enableCompression === true;
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
   * @param url A `ws:` or `wss:` URL without user info.
   * @param options Extra headers and an abort signal.
   * @returns The connection and the server's 101 response.
   * @throws {TypeError} When the URL is not `ws:` / `wss:`, holds user info,
   * or a header clashes with the handshake's own.
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
    const deadline = new Deadline(this.#handshakeTimeout, options.signal);
    const { signal } = deadline;
    // Every stage waits on the transport held here: aborting closes it, which
    // rejects whatever read, write or TLS handshake is pending on it.
    let transport: Deno.Conn | undefined;
    const closeOnAbort = () => closeQuietly(transport);
    signal.addEventListener("abort", closeOnAbort, { once: true });
    try {
      signal.throwIfAborted();
      const cookies = this.#cookieJar === undefined ? [] : await abortable(
        Promise.resolve(this.#cookieJar.getCookies(new URL(target))),
        signal,
      );
      const request = formatRequest(target, {
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
              this.#cookieJar.setCookies(new URL(target), setCookies),
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
    return this.#enableCompression ? DEFLATE_OFFER : undefined;
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
      return acceptDeflateResponse(answer);
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
   * Opens the byte stream to the server: TCP, through the proxy if there is
   * one, then TLS for `wss:`. `hold` is told of every connection as soon as
   * it exists, so an abort can close it at any stage.
   */
  async #openStream(
    target: URL,
    signal: AbortSignal,
    hold: (conn: Deno.Conn) => void,
  ): Promise<Deno.Conn> {
    const proxy = await this.#proxyFor(target, signal);
    const address = addressOf(target);
    let conn: Deno.Conn;
    if (proxy === null) {
      conn = await this.#open(address, signal);
      hold(conn);
    } else {
      if (proxy.protocol === "https:" && target.protocol === "wss:") {
        throw new TypeError(
          "Cannot dial a wss: URL through an https: proxy: Deno cannot run TLS inside a TLS connection",
        );
      }
      conn = await this.#open(addressOf(proxy), signal);
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
    if (target.protocol === "wss:") {
      conn = await startTls(
        conn,
        this.#serverName ?? unbracket(target.hostname),
        { caCerts: this.#caCerts, signal, hold },
      );
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
    const proxy = chosen instanceof URL ? chosen : parseProxyUrl(chosen);
    if (!PROXY_PORTS.has(proxy.protocol)) {
      throw new TypeError(
        `Cannot dial through the proxy ${
          redact(proxy)
        }: its scheme is not http:, https:, socks5: or socks5h:`,
      );
    }
    return proxy;
  }

  /** Opens the TCP connection, closing it if it arrives after an abort. */
  async #open(
    address: ConnectAddress,
    signal: AbortSignal,
  ): Promise<Deno.Conn> {
    const connecting = this.#connect(address, { signal }).then((conn) => {
      if (signal.aborted) closeQuietly(conn);
      return conn;
    });
    return await abortable(connecting, signal);
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
 * @param url A `ws:` or `wss:` URL without user info.
 * @param options Extra headers and an abort signal.
 * @returns The connection and the server's 101 response.
 * @throws {TypeError} When the URL or a header is not acceptable.
 * @throws {BadHandshakeError} When the server does not upgrade.
 * @throws {ProxyError} When the proxy refuses the tunnel.
 *
 * @example Dialing a Deno.serve server
 * ```ts title="dial()"
 * import assert from "node:assert/strict";
 * import { dial } from "./dialer.ts";
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

/** Default ports of the schemes a dialer connects to. */
const PROXY_PORTS = new Map([
  ["http:", 80],
  ["https:", 443],
  ["socks5:", 1080],
  ["socks5h:", 1080],
]);

/** Parses and checks a WebSocket URL (RFC 6455 section 3). */
function parseWebSocketUrl(url: string | URL): URL {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (cause) {
    throw new TypeError(
      `Cannot dial ${JSON.stringify(String(url))}: it is not a valid URL`,
      { cause },
    );
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(
      `Cannot dial ${
        JSON.stringify(redact(parsed))
      }: the scheme must be ws: or wss:, not ${parsed.protocol}`,
    );
  }
  if (parsed.username !== "" || parsed.password !== "") {
    throw new TypeError(
      `Cannot dial ${
        JSON.stringify(redact(parsed))
      }: user info is not allowed in a WebSocket URL`,
    );
  }
  if (parsed.hostname === "") {
    throw new TypeError(`Cannot dial ${JSON.stringify(String(url))}: no host`);
  }
  return parsed;
}

/** Parses a proxy URL, taking `host:port` alone as an `http:` proxy. */
function parseProxyUrl(value: string): URL {
  try {
    const url = new URL(value);
    if (PROXY_PORTS.has(url.protocol)) return url;
  } catch {
    // Fall through: Go reads a bare "host:port" as an http proxy.
  }
  try {
    return new URL(`http://${value}`);
  } catch (cause) {
    throw new TypeError(
      `Cannot dial through the proxy ${
        JSON.stringify(value)
      }: it is not a valid URL`,
      { cause },
    );
  }
}

/** The URL with any password replaced, fit for an error message. */
function redact(url: URL): string {
  if (url.password === "") return url.href;
  const copy = new URL(url);
  copy.password = "xxxxx";
  return copy.href;
}

function unbracket(hostname: string): string {
  return hostname.startsWith("[") ? hostname.slice(1, -1) : hostname;
}

/** The TCP address of a URL, with the scheme's default port. */
function addressOf(url: URL): ConnectAddress {
  const port = url.port !== ""
    ? Number(url.port)
    : url.protocol === "wss:"
    ? 443
    : url.protocol === "ws:"
    ? 80
    : PROXY_PORTS.get(url.protocol)!;
  return { hostname: unbracket(url.hostname), port };
}

/** `host:port` for a CONNECT request (RFC 9110 section 9.3.6). */
function authorityOf(address: ConnectAddress): string {
  const host = address.hostname.includes(":")
    ? `[${address.hostname}]`
    : address.hostname;
  return `${host}:${address.port}`;
}

function connectTcp(
  address: ConnectAddress,
  options: { signal: AbortSignal },
): Promise<Deno.Conn> {
  return Deno.connect({ ...address, signal: options.signal });
}

// ---------------------------------------------------------------------------
// Options

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
// Time and cancellation

/**
 * One signal for the whole handshake: it aborts with the caller's reason or
 * with `Deno.errors.TimedOut` when the handshake timeout passes (the error
 * the Upgrader's handshake timeout gives too).
 */
class Deadline {
  readonly #controller = new AbortController();
  readonly #parent: AbortSignal | undefined;
  readonly #onParentAbort = () => this.#controller.abort(this.#parent!.reason);
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(timeoutMs: number, parent: AbortSignal | undefined) {
    this.#parent = parent;
    if (parent?.aborted) {
      this.#controller.abort(parent.reason);
      return;
    }
    parent?.addEventListener("abort", this.#onParentAbort, { once: true });
    if (timeoutMs > 0) {
      this.#timer = setTimeout(() => {
        this.#controller.abort(
          new Deno.errors.TimedOut(
            `Cannot open the WebSocket connection: the handshake timed out after ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
    }
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  clear(): void {
    clearTimeout(this.#timer);
    this.#parent?.removeEventListener("abort", this.#onParentAbort);
  }
}

/**
 * Settles with `promise`, or rejects with the signal's reason as soon as it
 * aborts. The promise is still observed afterwards, so it never rejects
 * unhandled.
 */
function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() =>
      signal.removeEventListener("abort", onAbort)
    );
  });
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
function formatRequest(target: URL, parts: RequestParts): Uint8Array {
  const lines = [
    `GET ${target.pathname}${target.search} HTTP/1.1`,
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
 * Reads the final response head, skipping interim 1xx answers other than
 * 101 (RFC 9110 section 15.2), and returns it with the bytes behind it.
 * `what` names the answer in errors ("handshake", "proxy").
 */
async function readResponse(
  conn: Deno.Conn,
  what: string,
): Promise<{ response: Response; rest: Uint8Array<ArrayBuffer> }> {
  let buffered: Uint8Array | undefined;
  for (;;) {
    let read;
    try {
      read = await readHead(conn, {
        maxHeadBytes: MAX_RESPONSE_HEAD_BYTES,
        buffered,
      });
    } catch (cause) {
      if (!(cause instanceof HttpError)) throw cause;
      throw new Deno.errors.InvalidData(
        `Cannot read the ${what} response: ${cause.message}`,
        { cause },
      );
    }
    if (read === null) {
      throw new Deno.errors.UnexpectedEof(
        `Cannot read the ${what} response: the connection closed before any answer`,
      );
    }
    const response = toResponse(read.head, what);
    if (response !== undefined) {
      return { response, rest: read.rest.slice() };
    }
    buffered = read.rest;
  }
}

/**
 * Parses a response head into a `Response` without a body, or undefined for
 * an interim 1xx answer that the caller skips.
 */
function toResponse(head: Uint8Array, what: string): Response | undefined {
  let parsed;
  try {
    parsed = parseResponseHead(head);
  } catch (cause) {
    throw new Deno.errors.InvalidData(
      `Cannot read the ${what} response: ${(cause as Error).message}`,
      { cause },
    );
  }
  const { status, statusText, headers } = parsed;
  if (status >= 100 && status < 200 && status !== 101) return undefined;
  if (status > 599) {
    throw new Deno.errors.InvalidData(
      `Cannot read the ${what} response: the status ${status} is not an HTTP status`,
    );
  }
  try {
    return new Response(null, { status, statusText, headers });
  } catch {
    // A reason phrase the Response constructor refuses is only cosmetic.
    return new Response(null, { status, headers });
  }
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

/**
 * Returns `response` with up to 1 KiB of the body the server sent behind it,
 * as gorilla keeps it "to aid application debugging". Waits at most
 * {@linkcode ERROR_BODY_WAIT_MS} for it.
 */
async function withErrorBody(
  response: Response,
  conn: Deno.Conn,
  rest: Uint8Array,
  signal: AbortSignal,
): Promise<Response> {
  const { status, headers } = response;
  if (status === 101 || status === 204 || status === 205 || status === 304) {
    return response;
  }
  const length = headers.get("content-length");
  const chunked = headerHasToken(headers, "transfer-encoding", "chunked");
  // How many raw bytes to read: the declared length, or for chunked and
  // close-delimited bodies enough to hold 1 KiB plus chunk framing.
  const wanted = chunked
    ? 8 * MAX_ERROR_BODY_BYTES
    : length !== null && /^\d+$/.test(length)
    ? Math.min(Number(length), MAX_ERROR_BODY_BYTES)
    : MAX_ERROR_BODY_BYTES;
  let raw: Uint8Array<ArrayBuffer> = rest.slice(0, wanted);
  const done = () =>
    raw.length >= wanted ||
    (chunked && decodeChunked(raw).complete);
  const wait = new Deadline(ERROR_BODY_WAIT_MS, signal);
  const stop = () => closeQuietly(conn);
  wait.signal.addEventListener("abort", stop, { once: true });
  try {
    while (!done() && !wait.signal.aborted) {
      const buffer = new Uint8Array(wanted - raw.length);
      const n = await conn.read(buffer);
      if (n === null) break;
      const joined = new Uint8Array(raw.length + n);
      joined.set(raw);
      joined.set(buffer.subarray(0, n), raw.length);
      raw = joined;
    }
  } catch {
    // Whatever arrived is kept: a reset or the wait ending is not the error
    // the caller is about to see.
  } finally {
    wait.signal.removeEventListener("abort", stop);
    wait.clear();
  }
  const body = chunked ? decodeChunked(raw).body : raw;
  return new Response(body.subarray(0, MAX_ERROR_BODY_BYTES), {
    status,
    statusText: response.statusText,
    headers,
  });
}

/**
 * Decodes as much of a chunked body (RFC 9112 section 7.1) as `raw` holds,
 * up to 1 KiB. `complete` says whether nothing more is needed.
 */
function decodeChunked(
  raw: Uint8Array,
): { body: Uint8Array<ArrayBuffer>; complete: boolean } {
  const parts: Uint8Array[] = [];
  let size = 0;
  let offset = 0;
  for (;;) {
    const lineEnd = raw.indexOf(0x0a, offset);
    if (lineEnd === -1) break;
    const line = decoder.decode(raw.subarray(offset, lineEnd)).trim();
    const chunkSize = parseInt(line.split(";")[0], 16);
    if (!(chunkSize >= 0)) return { body: concat(parts, size), complete: true };
    if (chunkSize === 0) return { body: concat(parts, size), complete: true };
    const start = lineEnd + 1;
    const chunk = raw.subarray(start, Math.min(start + chunkSize, raw.length));
    parts.push(chunk);
    size += chunk.length;
    if (size >= MAX_ERROR_BODY_BYTES) {
      return { body: concat(parts, size), complete: true };
    }
    if (start + chunkSize + 2 > raw.length) break;
    offset = start + chunkSize + 2;
  }
  return { body: concat(parts, size), complete: false };
}

function concat(parts: Uint8Array[], size: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

// ---------------------------------------------------------------------------
// TLS

interface StartTlsOptions {
  caCerts: string[] | undefined;
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
    });
  } catch (cause) {
    if (options.signal.aborted) throw cause;
    throw new TypeError(
      "Cannot start TLS: the connection is not a plain TCP connection",
      { cause },
    );
  }
  options.hold(tls);
  options.signal.throwIfAborted();
  await tls.handshake();
  return tls;
}

// ---------------------------------------------------------------------------
// Proxies

/**
 * Opens a tunnel with HTTP CONNECT (RFC 9110 section 9.3.6), with Basic
 * credentials (RFC 7617) from the proxy URL's user info.
 */
async function connectThroughHttpProxy(
  conn: Deno.Conn,
  proxy: URL,
  address: ConnectAddress,
  signal: AbortSignal,
): Promise<void> {
  const authority = authorityOf(address);
  const lines = [`CONNECT ${authority} HTTP/1.1`, `Host: ${authority}`];
  if (proxy.username !== "" || proxy.password !== "") {
    const credentials = `${decodeURIComponent(proxy.username)}:${
      decodeURIComponent(proxy.password)
    }`;
    lines.push(
      `Proxy-Authorization: Basic ${encodeBase64(encoder.encode(credentials))}`,
    );
  }
  await writeAll(conn, encoder.encode(lines.join("\r\n") + "\r\n\r\n"));
  const { response, rest } = await readResponse(conn, "proxy");
  if (response.status < 200 || response.status > 299) {
    throw new ProxyError(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it answered ${response.status}${
        response.statusText ? ` ${response.statusText}` : ""
      }`,
      response.status,
      await withErrorBody(response, conn, rest, signal),
    );
  }
  if (rest.length > 0) {
    // The server has not been spoken to yet, so nothing can follow the
    // proxy's answer; bytes here mean the proxy is not a CONNECT tunnel.
    throw new Deno.errors.InvalidData(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it sent ${rest.length} unexpected bytes after its answer`,
    );
  }
}

/** SOCKS5 reply codes (RFC 1928 section 6). */
const SOCKS5_REPLIES: Record<number, string> = {
  1: "general SOCKS server failure",
  2: "connection not allowed by ruleset",
  3: "network unreachable",
  4: "host unreachable",
  5: "connection refused",
  6: "TTL expired",
  7: "command not supported",
  8: "address type not supported",
};

/**
 * Opens a tunnel through a SOCKS5 proxy (RFC 1928), with username/password
 * authentication (RFC 1929) from the proxy URL's user info. The target's
 * host name is always sent to the proxy to resolve, for `socks5:` as for
 * `socks5h:`, so a name never leaks to the local resolver.
 */
async function connectThroughSocks5(
  conn: Deno.Conn,
  proxy: URL,
  address: ConnectAddress,
): Promise<void> {
  const reader = new ExactReader(conn, proxy);
  const username = encoder.encode(decodeURIComponent(proxy.username));
  const password = encoder.encode(decodeURIComponent(proxy.password));
  const withAuth = username.length > 0 || password.length > 0;
  if (username.length > 255 || password.length > 255) {
    throw new TypeError(
      "Cannot use the SOCKS5 proxy: its username and password must each be at most 255 bytes",
    );
  }
  // Greeting: version 5, the methods we support (0 = none, 2 = password).
  await writeAll(conn, Uint8Array.of(5, 1, withAuth ? 2 : 0));
  const [version, method] = await reader.read(2);
  if (version !== 5) {
    throw new Deno.errors.InvalidData(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it does not speak SOCKS5`,
    );
  }
  if (method === 2 && withAuth) {
    await writeAll(
      conn,
      Uint8Array.of(
        1,
        username.length,
        ...username,
        password.length,
        ...password,
      ),
    );
    const [, authStatus] = await reader.read(2);
    if (authStatus !== 0) {
      throw new ProxyError(
        `Cannot connect through the proxy ${
          redact(proxy)
        }: it refused the username and password`,
        authStatus,
      );
    }
  } else if (method !== 0) {
    throw new ProxyError(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it accepts none of the offered authentication methods`,
      method,
    );
  }
  await writeAll(conn, socks5ConnectRequest(address));
  const [, reply, , addressType] = await reader.read(4);
  if (reply !== 0) {
    throw new ProxyError(
      `Cannot connect through the proxy ${redact(proxy)}: it answered ${
        SOCKS5_REPLIES[reply] ?? `reply code ${reply}`
      }`,
      reply,
    );
  }
  // Skip the bound address the proxy reports: IPv4, a name, or IPv6.
  const addressLength = addressType === 1
    ? 4
    : addressType === 4
    ? 16
    : (await reader.read(1))[0];
  await reader.read(addressLength + 2);
}

/** A SOCKS5 CONNECT request for `address`, by IP or by name. */
function socks5ConnectRequest(address: ConnectAddress): Uint8Array {
  const ip = parseIp(address.hostname);
  const port = [address.port >> 8, address.port & 0xff];
  if (ip !== null && isIpv4Mapped(ip) && !address.hostname.includes(":")) {
    return Uint8Array.of(5, 1, 0, 1, ...ip.subarray(12), ...port);
  }
  if (ip !== null) return Uint8Array.of(5, 1, 0, 4, ...ip, ...port);
  const name = encoder.encode(address.hostname);
  if (name.length > 255) {
    throw new TypeError(
      "Cannot connect through the SOCKS5 proxy: the host name is longer than 255 bytes",
    );
  }
  return Uint8Array.of(5, 1, 0, 3, name.length, ...name, ...port);
}

/** Reads exact byte counts off a connection, for the SOCKS5 exchange. */
class ExactReader {
  #conn: Deno.Conn;
  #proxy: URL;

  constructor(conn: Deno.Conn, proxy: URL) {
    this.#conn = conn;
    this.#proxy = proxy;
  }

  async read(length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    for (let offset = 0; offset < length;) {
      const n = await this.#conn.read(out.subarray(offset));
      if (n === null) {
        throw new Deno.errors.UnexpectedEof(
          `Cannot connect through the proxy ${
            redact(this.#proxy)
          }: it closed the connection mid-answer`,
        );
      }
      offset += n;
    }
    return out;
  }
}

// ---------------------------------------------------------------------------
// Proxies from the environment

/**
 * Picks the proxy for a WebSocket URL from the environment, as Go's
 * `http.ProxyFromEnvironment` does (gorilla's default): `HTTPS_PROXY` for
 * `wss:`, `HTTP_PROXY` for `ws:` (lower-case names too), unless `NO_PROXY`
 * matches the host. `NO_PROXY` is a comma-separated list of host names
 * (`example.com` also matches its subdomains, `.example.com` only them), IP
 * addresses, CIDR ranges, each optionally with `:port`, or `*` for all.
 * Loopback hosts are never proxied. Without `--allow-env` for these
 * variables it returns `null` (and never prompts).
 *
 * @param target The `ws:` or `wss:` URL to dial.
 * @returns The proxy URL, or `null` to connect directly.
 *
 * @example Reading the environment
 * ```ts title="proxyFromEnvironment()"
 * import assert from "node:assert/strict";
 * import { proxyFromEnvironment } from "./dialer.ts";
 *
 * // Loopback never goes through a proxy, whatever the environment says.
 * assert.equal(proxyFromEnvironment(new URL("ws://127.0.0.1:8080/")), null);
 * ```
 */
export function proxyFromEnvironment(target: URL): URL | null {
  const secure = target.protocol === "wss:" || target.protocol === "https:";
  // A CGI program gets HTTP_PROXY from the request's Proxy header
  // ("httpoxy"), so Go ignores it there; so do we.
  const value = secure
    ? readEnv("HTTPS_PROXY", "https_proxy")
    : readEnv("REQUEST_METHOD") === ""
    ? readEnv("HTTP_PROXY", "http_proxy")
    : "";
  if (value === "") return null;
  const hostname = unbracket(target.hostname).toLowerCase();
  if (hostname === "localhost") return null;
  const ip = parseIp(hostname);
  if (ip !== null && isLoopback(ip)) return null;
  const port = addressOf(target).port;
  if (noProxyMatches(readEnv("NO_PROXY", "no_proxy"), hostname, ip, port)) {
    return null;
  }
  try {
    return parseProxyUrl(value);
  } catch {
    return null;
  }
}

/**
 * The first of the variables that is set and readable. Permission is queried
 * first so a missing `--allow-env` never prompts.
 */
function readEnv(...names: string[]): string {
  for (const name of names) {
    let state;
    try {
      state = Deno.permissions.querySync({ name: "env", variable: name }).state;
    } catch {
      return "";
    }
    if (state !== "granted") continue;
    const value = Deno.env.get(name);
    if (value !== undefined && value !== "") return value;
  }
  return "";
}

/** Whether a `NO_PROXY` list exempts the host (Go's `httpproxy` rules). */
function noProxyMatches(
  list: string,
  hostname: string,
  ip: Uint8Array | null,
  port: number,
): boolean {
  for (let entry of list.split(",")) {
    entry = entry.trim().toLowerCase();
    if (entry === "") continue;
    if (entry === "*") return true;
    const slash = entry.indexOf("/");
    if (slash !== -1) {
      const network = parseIp(entry.slice(0, slash));
      const bits = Number(entry.slice(slash + 1));
      if (network === null || ip === null || !Number.isInteger(bits)) continue;
      const prefix = entry.includes(":") ? bits : bits + 96;
      if (prefixMatches(network, ip, prefix)) return true;
      continue;
    }
    let entryHost = entry;
    let entryPort = 0;
    const hostPort = /^(\[[^\]]*\]|[^:]*):(\d+)$/.exec(entry);
    if (hostPort !== null) {
      entryHost = hostPort[1];
      entryPort = Number(hostPort[2]);
    }
    entryHost = unbracket(entryHost);
    if (entryPort !== 0 && entryPort !== port) continue;
    const entryIp = parseIp(entryHost);
    if (entryIp !== null) {
      if (ip !== null && entryIp.every((byte, i) => byte === ip[i])) {
        return true;
      }
      continue;
    }
    if (entryHost.startsWith("*.")) entryHost = entryHost.slice(1);
    if (entryHost.startsWith(".")) {
      if (hostname.endsWith(entryHost)) return true;
    } else if (hostname === entryHost || hostname.endsWith(`.${entryHost}`)) {
      return true;
    }
  }
  return false;
}

function prefixMatches(
  network: Uint8Array,
  ip: Uint8Array,
  bits: number,
): boolean {
  if (bits < 0 || bits > 128) return false;
  for (let i = 0; i < 16 && bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((network[i] & mask) !== (ip[i] & mask)) return false;
  }
  return true;
}

/**
 * Parses an IPv4 or IPv6 literal into 16 bytes (IPv4 as `::ffff:a.b.c.d`, so
 * both forms compare equal, as in Go), or returns null.
 */
function parseIp(text: string): Uint8Array | null {
  const out = new Uint8Array(16);
  const v4 = parseIpv4(text);
  if (v4 !== null) {
    out[10] = out[11] = 0xff;
    out.set(v4, 12);
    return out;
  }
  if (!text.includes(":")) return null;
  // An IPv6 literal may end in dotted IPv4 (RFC 4291 section 2.2 item 3):
  // rewrite it as the two 16-bit groups it stands for.
  const lastColon = text.lastIndexOf(":");
  const last = text.slice(lastColon + 1);
  if (last.includes(".")) {
    const embedded = parseIpv4(last);
    if (embedded === null) return null;
    const high = ((embedded[0] << 8) | embedded[1]).toString(16);
    const low = ((embedded[2] << 8) | embedded[3]).toString(16);
    text = `${text.slice(0, lastColon + 1)}${high}:${low}`;
  }
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const split = (half: string) => half === "" ? [] : half.split(":");
  const head = split(halves[0]);
  const tail = halves.length === 2 ? split(halves[1]) : [];
  const missing = 8 - head.length - tail.length;
  // "::" stands for at least one zero group; without it all 8 are written.
  if (halves.length === 2 ? missing < 1 : missing !== 0) return null;
  const groups = [...head, ...new Array(missing).fill("0"), ...tail];
  for (let i = 0; i < 8; i++) {
    if (!/^[0-9a-f]{1,4}$/i.test(groups[i])) return null;
    const word = parseInt(groups[i], 16);
    out[2 * i] = word >> 8;
    out[2 * i + 1] = word & 0xff;
  }
  return out;
}

function parseIpv4(text: string): number[] | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  const bytes = parts.map((part) =>
    /^(0|[1-9]\d{0,2})$/.test(part) ? Number(part) : 256
  );
  return bytes.every((byte) => byte < 256) ? bytes : null;
}

function isIpv4Mapped(ip: Uint8Array): boolean {
  return ip.subarray(0, 10).every((byte) => byte === 0) && ip[10] === 0xff &&
    ip[11] === 0xff;
}

function isLoopback(ip: Uint8Array): boolean {
  if (isIpv4Mapped(ip)) return ip[12] === 127;
  return ip.subarray(0, 15).every((byte) => byte === 0) && ip[15] === 1;
}
