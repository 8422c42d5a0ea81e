// The HTTP/1.1 server behind serve(): a front end on Deno.listen /
// Deno.listenTls with Deno.serve's handler shape, whose connections an
// Upgrader can take over (see _hijack.ts). Deno.serve cannot hand over its
// socket (its upgradeWebSocket() gives a finished WebSocket, never the raw
// connection), which is why this exists. Body decoding is in _http_body.ts,
// response encoding in _http_response.ts.
//
// Each connection runs one loop: read a head, build a Request, await the
// handler, write the Response, finish the request body, repeat. Nothing is
// read ahead of what the current request needs, so the bytes behind an
// upgrade request are still buffered, untouched, when the Upgrader takes the
// socket. Pipelined requests are answered in order for the same reason.

import {
  CLOSE_CODE,
  CloseError,
  ConnectionClosedError,
  ProtocolError,
} from "./frame.ts";
import { HandshakeError, listHasToken } from "./_handshake.ts";
import { closeQuietly, lingeringClose, withContext, writeAll } from "./_io.ts";
import {
  bodyFinished,
  bodyFraming,
  type BodySource,
  type Framing,
  nextBodyPiece,
  truncatedBody,
} from "./_http_body.ts";
import {
  encodeRefusal,
  plainResponse,
  writeResponse,
} from "./_http_response.ts";
import {
  type Closer,
  type HijackedConnection,
  registerConnection,
} from "./_hijack.ts";
import {
  DEFAULT_MAX_HEADERS,
  DEFAULT_MAX_REQUEST_LINE_BYTES,
  HttpError,
  parseRequestHead,
  readHead,
  type RequestHead,
} from "./_http.ts";

/**
 * Options for {@linkcode serve}: where to listen, TLS, callbacks, and the
 * limits and timeouts that protect the server from hostile clients.
 *
 * @example Serve HTTPS with a certificate and key
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, type ServeOptions } from "@denows/websocket";
 *
 * const read = (name: string) =>
 *   Deno.readTextFile(new URL(`./tests/fixtures/${name}`, import.meta.url));
 * const options: ServeOptions = {
 *   hostname: "127.0.0.1",
 *   port: 0,
 *   cert: await read("cert.pem"),
 *   key: await read("key.pem"),
 *   headTimeout: 5000,
 *   onListen() {},
 * };
 * await using server = serve(options, () => new Response("secure"));
 * using client = Deno.createHttpClient({ caCerts: [await read("ca.pem")] });
 * const response = await fetch(`https://localhost:${server.addr.port}/`, {
 *   client,
 * });
 * assert.equal(await response.text(), "secure");
 * ```
 */
export interface ServeOptions {
  /** Port to listen on; `0` picks a free one (see `onListen` / `addr`). Default `8000`. */
  port?: number;
  /**
   * Address to listen on. Default `"0.0.0.0"` (every IPv4 interface), as
   * `Deno.serve`; use `"127.0.0.1"` to accept local clients only.
   */
  hostname?: string;
  /**
   * Let several processes listen on the same port, the kernel spreading
   * connections among them (Linux `SO_REUSEPORT`): one process per core.
   * Plain TCP only; in Deno 2.9 it needs `--unstable-net`. Default false.
   */
  reusePort?: boolean;
  /** PEM certificate chain: with `key`, serves HTTPS (and `wss:`). */
  cert?: string;
  /** PEM private key for `cert`. */
  key?: string;
  /** Aborting it shuts the server down gracefully, as `shutdown()` does. */
  signal?: AbortSignal;
  /**
   * Called once the server listens. Default: logs
   * `Listening on http://<hostname>:<port>/`.
   */
  onListen?: (addr: Deno.NetAddr) => void;
  /**
   * Turns an error thrown by the handler into the response sent. Default:
   * logs the error to stderr with the request's method and path, and
   * answers `500 Internal Server Error`. A handler that fails after taking
   * its connection over (a rejection after `upgrader.upgrade(request)`) is
   * reported here too: the Response is then dropped, as the connection
   * speaks WebSocket, and the WebSocket is closed with 1011 (internal
   * error). Not reported: a refused handshake, which the Upgrader has
   * answered and reports itself, and the errors that only say the
   * WebSocket ended (`CloseError`, `ProtocolError`, `ConnectionClosedError`
   * escaping a read loop).
   */
  onError?: (error: unknown) => Response | Promise<Response>;
  /** Most bytes a request head may take; larger heads get 431. Default 16 KiB. */
  maxHeadBytes?: number;
  /** Most bytes the request line may take; longer ones get 414. Default 8 KiB. */
  maxRequestLineBytes?: number;
  /** Most header fields a request may have; more get 431. Default 100. */
  maxHeaders?: number;
  /**
   * Milliseconds a request head may take from its first byte to its blank
   * line; slower heads (slowloris) get 408 and the connection closes.
   * Default 10 000.
   */
  headTimeout?: number;
  /**
   * Milliseconds a keep-alive connection may wait for the first byte of its
   * next request before it is closed, and a request body for its next bytes
   * (then the body fails and the client gets 408). Default 30 000.
   */
  idleTimeout?: number;
}

/**
 * What {@linkcode serve} passes to the handler beside the request.
 *
 * @example Answer with the client's address
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, type ServeHandlerInfo } from "@denows/websocket";
 *
 * await using server = serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   (_request: Request, info: ServeHandlerInfo) =>
 *     new Response(info.remoteAddr.hostname),
 * );
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * assert.equal(await response.text(), "127.0.0.1");
 * ```
 */
export interface ServeHandlerInfo {
  /** The client's address. */
  remoteAddr: Deno.NetAddr;
  /**
   * Settles when the response has been written out, or the connection
   * ended first, or the connection was taken over. Never rejects.
   */
  completed: Promise<void>;
}

/**
 * Answers a request, like a `Deno.serve` handler, so fetch-style handlers
 * and routers plug in as they are. It returns nothing only for a request
 * whose connection it took over (`upgrader.upgrade(request)`).
 *
 * @example A small router
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, type ServeHandler } from "@denows/websocket";
 *
 * const router: ServeHandler = async (request) => {
 *   const { pathname } = new URL(request.url);
 *   if (request.method === "POST" && pathname === "/echo") {
 *     return new Response(await request.text());
 *   }
 *   return new Response("not found", { status: 404 });
 * };
 * await using server = serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   router,
 * );
 * const base = `http://127.0.0.1:${server.addr.port}`;
 * const echoed = await fetch(`${base}/echo`, { method: "POST", body: "hi" });
 * assert.equal(await echoed.text(), "hi");
 * const missing = await fetch(`${base}/other`);
 * assert.equal(missing.status, 404);
 * await missing.body?.cancel();
 * ```
 */
export type ServeHandler = (
  request: Request,
  info: ServeHandlerInfo,
) => Response | void | Promise<Response | void>;

/**
 * Options for {@linkcode Server.shutdown}.
 *
 * @example Give in-flight requests one second
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, type ShutdownOptions } from "@denows/websocket";
 *
 * const server = serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   () => new Response("ok"),
 * );
 * const options: ShutdownOptions = { timeout: 1000, closeWebSockets: true };
 * await server.shutdown(options);
 * await assert.rejects(
 *   Deno.connect({ hostname: "127.0.0.1", port: server.addr.port }),
 * );
 * ```
 */
export interface ShutdownOptions {
  /**
   * Also close the WebSocket connections upgraded from this server, each
   * with a closing handshake (close code 1001, "going away"). Default false:
   * they stay open and belong to the application.
   */
  closeWebSockets?: boolean;
  /**
   * Milliseconds to wait for in-flight requests (and closing handshakes)
   * before their sockets are closed. Default 5000.
   */
  timeout?: number;
}

/**
 * A running server, returned by {@linkcode serve}. Disposing of it
 * (`await using`) shuts it down.
 *
 * @example Wait for the server to finish after a shutdown
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, type Server } from "@denows/websocket";
 *
 * const controller = new AbortController();
 * const server: Server = serve(
 *   { hostname: "127.0.0.1", port: 0, signal: controller.signal, onListen() {} },
 *   () => new Response("bye"),
 * );
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * assert.equal(await response.text(), "bye");
 * controller.abort();
 * await server.finished;
 * ```
 */
export interface Server extends AsyncDisposable {
  /** The address the server listens on (with the real port when `port` was 0). */
  readonly addr: Deno.NetAddr;
  /**
   * Settles once the server has stopped: the listener closed and every HTTP
   * connection ended (and, when asked, every WebSocket closed). Never
   * rejects.
   */
  readonly finished: Promise<void>;
  /**
   * Stops accepting connections, closes idle ones, lets in-flight requests
   * finish (up to `timeout`) and resolves when all has ended. Calling it
   * again returns the same promise.
   */
  shutdown(options?: ShutdownOptions): Promise<void>;
}

const DEFAULT_MAX_HEAD_BYTES = 16 * 1024;
const DEFAULT_HEAD_TIMEOUT = 10_000;
const DEFAULT_IDLE_TIMEOUT = 30_000;
const DEFAULT_SHUTDOWN_TIMEOUT = 5000;
/** Unread request body a keep-alive connection may discard; more closes it. */
const MAX_DRAIN_BYTES = 256 * 1024;
const BODY_READ_SIZE = 64 * 1024;

const noop = () => {};

const CONTINUE = new TextEncoder().encode("HTTP/1.1 100 Continue\r\n\r\n");

/**
 * Serves HTTP/1.1 on TCP, or TLS with `cert` and `key`, calling `handler`
 * for every request as `Deno.serve` does; unlike `Deno.serve`, a handler can
 * take the connection over with `upgrader.upgrade(request)`.
 *
 * Requests have streaming bodies (`Content-Length` or chunked, with
 * `Expect: 100-continue` answered when the body is first read); responses go
 * out with `Content-Length` when the body is complete at once, chunked when
 * it streams (HTTP/1.0 clients: until the connection closes). Connections are
 * kept alive and pipelined requests answered in order. Malformed, oversized
 * or too slow requests get 400, 408, 414, 431, 501 or 505 and their
 * connection is closed without disturbing others. `request.signal` aborts
 * when the client leaves before its response has been written.
 *
 * @param options Where to listen, TLS, limits, timeouts, callbacks.
 * @param handler Answers each request.
 * @returns The running server.
 * @throws {TypeError} If `handler` is not a function, `options` is not an
 * object, or only one of `cert` and `key` is given.
 * @throws {RangeError} If a limit or timeout is not a positive number.
 * @throws {Deno.errors.AddrInUse} If the port is taken (and other listen errors).
 * @throws {DOMException} The reason of `signal` if it is already aborted.
 *
 * @example Serve a request on a free port
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve } from "@denows/websocket";
 *
 * const server = serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   (request) => new Response(`Hello ${new URL(request.url).pathname}`),
 * );
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/world`);
 * assert.equal(await response.text(), "Hello /world");
 * await server.shutdown();
 * ```
 */
export function serve(options: ServeOptions, handler: ServeHandler): Server {
  if (typeof handler !== "function") {
    throw new TypeError(
      `Cannot serve: the handler must be a function, got ${typeof handler}`,
    );
  }
  if (options === null || typeof options !== "object") {
    throw new TypeError("Cannot serve: options must be an object");
  }
  return new HttpServer(options, handler);
}

function positive(
  value: number | undefined,
  name: string,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !(value > 0)) {
    throw new RangeError(
      `Cannot serve: ${name} must be a positive number, got ${value}`,
    );
  }
  return value;
}

interface Settings {
  maxHeadBytes: number;
  maxRequestLineBytes: number;
  maxHeaders: number;
  headTimeout: number;
  idleTimeout: number;
}

class HttpServer implements Server {
  readonly #listener: Deno.Listener;
  readonly #handler: ServeHandler;
  readonly #onError: ServeOptions["onError"];
  readonly #settings: Settings;
  readonly #scheme: "http" | "https";
  readonly #connections = new Set<HttpConnection>();
  readonly #closers = new Set<Closer>();
  readonly #finished = Promise.withResolvers<void>();
  readonly #accepting: Promise<void>;
  #shutdown: Promise<void> | undefined;
  /** Set while shutdown closes WebSockets: the timeout their closers get. */
  #closingWebSockets: number | undefined;
  #closing = false;

  constructor(options: ServeOptions, handler: ServeHandler) {
    this.#handler = handler;
    this.#onError = options.onError;
    this.#settings = {
      maxHeadBytes: positive(
        options.maxHeadBytes,
        "maxHeadBytes",
        DEFAULT_MAX_HEAD_BYTES,
      ),
      maxRequestLineBytes: positive(
        options.maxRequestLineBytes,
        "maxRequestLineBytes",
        DEFAULT_MAX_REQUEST_LINE_BYTES,
      ),
      maxHeaders: positive(
        options.maxHeaders,
        "maxHeaders",
        DEFAULT_MAX_HEADERS,
      ),
      headTimeout: positive(
        options.headTimeout,
        "headTimeout",
        DEFAULT_HEAD_TIMEOUT,
      ),
      idleTimeout: positive(
        options.idleTimeout,
        "idleTimeout",
        DEFAULT_IDLE_TIMEOUT,
      ),
    };
    if ((options.cert === undefined) !== (options.key === undefined)) {
      throw new TypeError(
        "Cannot serve over TLS: cert and key must be given together",
      );
    }
    const hostname = options.hostname ?? "0.0.0.0";
    const port = options.port ?? 8000;
    options.signal?.throwIfAborted();
    const { cert, key } = options;
    this.#scheme = cert !== undefined ? "https" : "http";
    try {
      this.#listener = cert !== undefined && key !== undefined
        ? Deno.listenTls({ hostname, port, cert, key })
        : Deno.listen({ hostname, port, reusePort: options.reusePort });
    } catch (error) {
      const host = hostname.includes(":") ? `[${hostname}]` : hostname;
      throw withContext(error, `Cannot listen on ${host}:${port}`);
    }
    const onListen = options.onListen ?? ((addr: Deno.NetAddr) => {
      const host = addr.hostname.includes(":")
        ? `[${addr.hostname}]`
        : addr.hostname;
      console.log(`Listening on ${this.#scheme}://${host}:${addr.port}/`);
    });
    try {
      onListen(this.addr);
    } catch (error) {
      this.#listener.close();
      throw error;
    }
    options.signal?.addEventListener("abort", () => this.shutdown(), {
      once: true,
    });
    this.#accepting = this.#accept();
  }

  get addr(): Deno.NetAddr {
    return this.#listener.addr as Deno.NetAddr;
  }

  get finished(): Promise<void> {
    return this.#finished.promise;
  }

  get closing(): boolean {
    return this.#closing;
  }

  get settings(): Settings {
    return this.#settings;
  }

  get scheme(): "http" | "https" {
    return this.#scheme;
  }

  get handler(): ServeHandler {
    return this.#handler;
  }

  /**
   * Runs `onError` (by default, logs that `request` failed), falling back to
   * a plain 500 if it fails too.
   */
  async errorResponse(
    error: unknown,
    request: RequestLine,
  ): Promise<Response> {
    try {
      const response = this.#onError === undefined
        ? defaultOnError(error, request)
        : await this.#onError(error);
      if (response instanceof Response) return response;
      console.error(
        new TypeError("onError returned something other than a Response"),
      );
    } catch (onErrorFailure) {
      console.error(onErrorFailure);
    }
    return plainResponse(500);
  }

  /** Registers a WebSocket closer for shutdown. */
  track(closer: Closer): void {
    if (this.#closingWebSockets !== undefined) {
      // Upgraded while shutdown is closing WebSockets: close it right away.
      const closing = Promise.resolve().then(() =>
        closer.closeWith(CLOSE_CODE.GoingAway, this.#closingWebSockets!)
      );
      closing.catch(() => {});
      return;
    }
    this.#closers.add(closer);
  }

  /** Unregisters a closer: one function per server, handed to every taker. */
  readonly untrack = (closer: Closer): void => {
    this.#closers.delete(closer);
  };

  forget(connection: HttpConnection): void {
    this.#connections.delete(connection);
  }

  async #accept(): Promise<void> {
    let backoff = 5;
    while (!this.#closing) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing || error instanceof Deno.errors.BadResource) break;
        // Transient failures (too many open files, aborted handshakes) must
        // not stop the server; wait a little so a storm cannot spin the CPU.
        await new Promise((resolve) => setTimeout(resolve, backoff));
        backoff = Math.min(backoff * 2, 1000);
        continue;
      }
      backoff = 5;
      if (this.#closing) {
        closeQuietly(conn);
        break;
      }
      const connection = new HttpConnection(this, conn);
      this.#connections.add(connection);
      connection.run();
    }
  }

  shutdown(options: ShutdownOptions = {}): Promise<void> {
    this.#shutdown ??= this.#stop(options);
    return this.#shutdown;
  }

  async #stop(options: ShutdownOptions): Promise<void> {
    const timeout = options.timeout ?? DEFAULT_SHUTDOWN_TIMEOUT;
    this.#closing = true;
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    for (const connection of this.#connections) connection.closeIfIdle();
    const waits: Promise<unknown>[] = [this.#accepting];
    if (this.#connections.size > 0) {
      waits.push(this.#drainConnections(timeout));
    }
    if (options.closeWebSockets) {
      this.#closingWebSockets = timeout;
      for (const closer of this.#closers) {
        waits.push(
          Promise.resolve().then(() =>
            closer.closeWith(CLOSE_CODE.GoingAway, timeout)
          ),
        );
      }
      this.#closers.clear();
    }
    await Promise.allSettled(waits);
    this.#finished.resolve();
  }

  async #drainConnections(timeout: number): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, timeout);
    });
    const ended = Promise.allSettled(
      [...this.#connections].map((connection) => connection.done),
    );
    await Promise.race([ended, expired]);
    clearTimeout(timer);
    // Past the timeout, sockets are closed without waiting for handlers that
    // may never return; their writes then fail and their loops end.
    for (const connection of this.#connections) connection.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.shutdown();
  }
}

/** The request a handler failed on, for the log: method and target. */
type RequestLine = Pick<RequestHead, "method" | "target">;

function defaultOnError(error: unknown, request: RequestLine): Response {
  // The query may carry credentials: the path is enough to find the handler.
  const path = request.target.split("?", 1)[0];
  console.error(`Request handler failed: ${request.method} ${path}:`, error);
  return plainResponse(500);
}

/** How long a failed handler's WebSocket waits for the peer's close frame. */
const FAILED_CLOSE_TIMEOUT = 1000;

/**
 * A request's connection as serve() sees it after a handler took it over:
 * a handler that fails afterwards is reported as one that fails before it,
 * and its WebSocket is closed with 1011 (RFC 6455 section 7.4.1). It holds
 * neither the Request nor the HttpConnection, which live no longer than the
 * handshake, only the request line for the log and the Upgrader's closer;
 * and it lives only as long as the handler runs (the closer unregisters
 * itself from the server, not through this).
 */
class Takeover {
  readonly #server: HttpServer;
  readonly #request: RequestLine;
  #closer: Closer | undefined;

  constructor(server: HttpServer, request: RequestLine) {
    this.#server = server;
    this.#request = { method: request.method, target: request.target };
  }

  /** The HijackedConnection's `track`, keeping the closer for `failed()`. */
  track(closer: Closer): void {
    this.#closer = closer;
    this.#server.track(closer);
  }

  /** The handler rejected after taking the connection. */
  failed(error: unknown): void {
    if (
      // Answered with its HTTP error response and reported by the Upgrader.
      error instanceof HandshakeError ||
      // The WebSocket ended (the peer closed, broke the protocol or went
      // away, or it was closed here): how a connection ends, not a bug.
      error instanceof CloseError || error instanceof ProtocolError ||
      error instanceof ConnectionClosedError
    ) return;
    this.#server.errorResponse(error, this.#request).then(
      (response) => response.body?.cancel().catch(noop),
    );
    this.#closer?.closeWith(CLOSE_CODE.InternalServerErr, FAILED_CLOSE_TIMEOUT)
      .catch(noop);
  }
}

/** What the connection knows about the current request body. */
interface BodyState {
  /** `Expect: 100-continue` is still to be answered. */
  expectContinue: boolean;
  /** The framing error that broke the body, if any. */
  error: HttpError | undefined;
  /** The body read in flight, so the connection can wait for it. */
  pending: Promise<unknown>;
  /** The response is out: the handler may no longer read the body. */
  detached: boolean;
}

function newBodyState(): BodyState {
  return {
    expectContinue: false,
    error: undefined,
    pending: Promise.resolve(),
    detached: false,
  };
}

/** Calls `handler`; a synchronous throw becomes a rejection. */
async function callHandler(
  handler: ServeHandler,
  request: Request,
  info: ServeHandlerInfo,
): Promise<Response | void> {
  return await handler(request, info);
}

/**
 * Waits for a handler's result until `abandon()` (the connection was taken
 * over), which settles the wait with undefined. A Response the handler
 * returns after that is never sent, so its body is cancelled; a rejection
 * after that goes to `takeover.failed()`. A module function, so that the
 * handler's promise references nothing of the connection that abandoned it.
 */
function abandonable(result: Promise<Response | void>, takeover: Takeover): {
  settled: Promise<Response | void>;
  abandon(): void;
} {
  const abandoned = Promise.withResolvers<void>();
  let isAbandoned = false;
  result.then((response) => {
    if (isAbandoned) response?.body?.cancel().catch(noop);
  }, (error) => {
    if (isAbandoned) takeover.failed(error);
  });
  return {
    settled: Promise.race([result, abandoned.promise]),
    abandon() {
      isAbandoned = true;
      abandoned.resolve();
    },
  };
}

/** One client connection and its request loop. */
class HttpConnection implements BodySource {
  readonly #server: HttpServer;
  readonly #conn: Deno.Conn;
  readonly #done = Promise.withResolvers<void>();
  /** Bytes read from the socket and not consumed yet. */
  #buffered: Uint8Array = new Uint8Array(0);
  #idle = true;
  #closed = false;
  #taken = false;
  /** The current request's body, and whether its response has begun. */
  #bodyState: BodyState = newBodyState();
  #responseStarted = false;
  /** Aborts `request.signal` when the client leaves before its response. */
  #requestAbort: AbortController | undefined;
  #responseDone = false;
  /**
   * A read issued while a bodiless request is handled, to notice the client
   * leaving (EOF or reset). Its bytes are the start of the next request.
   */
  #early: Promise<Uint8Array | null> | undefined;
  /** Ends the wait for a handler whose request's connection was taken. */
  #onTaken: (() => void) | undefined;

  constructor(server: HttpServer, conn: Deno.Conn) {
    this.#server = server;
    this.#conn = conn;
  }

  /** Settles when the connection has ended or was taken over. */
  get done(): Promise<void> {
    return this.#done.promise;
  }

  close(): void {
    if (this.#closed || this.#taken) return;
    this.#closed = true;
    closeQuietly(this.#conn);
    if (!this.#responseDone) this.#requestAbort?.abort();
  }

  /** Shutdown closes connections that are between requests. */
  closeIfIdle(): void {
    if (this.#idle) this.close();
  }

  async run(): Promise<void> {
    try {
      while (!this.#server.closing && await this.#serveOne());
    } catch {
      // The socket failed (reset, TLS error, closed by shutdown): nothing to
      // answer, the connection is simply over.
    } finally {
      if (!this.#taken) {
        this.close();
        this.#server.forget(this);
      }
      this.#done.resolve();
    }
  }

  /** Serves one request; resolves whether the connection may carry another. */
  async #serveOne(): Promise<boolean> {
    this.#idle = true;
    const read = await this.#readHead();
    if (read === null) return false;
    this.#idle = false;
    let head: RequestHead;
    let framing: Framing;
    let request: Request;
    try {
      head = parseRequestHead(read, this.#server.settings);
      framing = bodyFraming(head);
      this.#bodyState = newBodyState();
      this.#responseStarted = false;
      this.#responseDone = false;
      this.#requestAbort = new AbortController();
      request = this.#buildRequest(head, framing, this.#requestAbort.signal);
    } catch (error) {
      if (!(error instanceof HttpError)) throw error;
      await this.#refuse(error.status);
      return false;
    }
    // Reading ahead is safe only when nothing else will read the socket
    // while the handler runs: no body to stream, no upgrade to hand over.
    if (bodyFinished(framing) && !("upgrade" in head.fields)) {
      this.#watchClient(this.#requestAbort);
    }
    return await this.#respond(head, framing, request);
  }

  /**
   * Reads the next request head. Waiting for its first byte is bounded by
   * idleTimeout, the whole head by headTimeout from that byte on; a slow
   * head is answered 408, an idle connection closed silently.
   */
  async #readHead(): Promise<Uint8Array | null> {
    const { idleTimeout, headTimeout, maxHeadBytes } = this.#server.settings;
    const controller = new AbortController();
    let started = this.#buffered.length > 0;
    let timer = setTimeout(
      () => controller.abort(),
      started ? headTimeout : idleTimeout,
    );
    const reader = {
      read: async (buffer: Uint8Array) => {
        const n = await this.#read(buffer);
        if (!started && n !== null && n > 0) {
          started = true;
          clearTimeout(timer);
          timer = setTimeout(() => controller.abort(), headTimeout);
        }
        return n;
      },
    };
    try {
      const result = await readHead(reader, {
        maxHeadBytes,
        signal: controller.signal,
        buffered: this.#buffered,
      });
      if (result === null) return null;
      this.#buffered = result.rest;
      return result.head;
    } catch (error) {
      if (controller.signal.aborted) {
        if (started) await this.#refuse(408);
        return null;
      }
      if (error instanceof HttpError) {
        await this.#refuse(error.status);
        return null;
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Reads from the socket for the next request head, taking the bytes of
   * the read-ahead first.
   */
  async #read(buffer: Uint8Array): Promise<number | null> {
    const early = this.#early;
    if (early === undefined) return await this.#conn.read(buffer);
    this.#early = undefined;
    const bytes = await early;
    if (bytes === null) return null;
    const n = Math.min(bytes.length, buffer.length);
    buffer.set(bytes.subarray(0, n));
    if (n < bytes.length) this.#early = Promise.resolve(bytes.subarray(n));
    return n;
  }

  /**
   * Reads ahead while the handler runs so that the end of the connection is
   * noticed (as Go's server does) and `request.signal` aborts: a handler
   * streaming to a client that left can stop. Whatever arrives instead is
   * kept for the next request.
   */
  #watchClient(abort: AbortController): void {
    const buffer = new Uint8Array(4096);
    this.#early = this.#conn.read(buffer).then((n) => {
      if (n === null && !this.#responseDone) abort.abort();
      return n === null ? null : buffer.subarray(0, n);
    }, (error) => {
      if (!this.#responseDone) abort.abort();
      throw error;
    });
    this.#early.catch(() => {});
  }

  #buildRequest(
    head: RequestHead,
    framing: Framing,
    signal: AbortSignal,
  ): Request {
    const url = requestUrl(head, this.#server.scheme, this.#conn.localAddr);
    const method = head.method;
    if (/^(?:CONNECT|TRACE|TRACK)$/i.test(method)) {
      throw new HttpError(
        501,
        `Cannot serve the request: method ${method} is not supported`,
      );
    }
    const hasBody = framing.kind === "chunked" || framing.remaining > 0;
    // A GET or HEAD body cannot be given to a Request; it is discarded
    // after the response so the connection stays in step.
    const bodyAllowed = !/^(?:GET|HEAD)$/i.test(method);
    try {
      return new Request(url, {
        method,
        signal,
        headers: head.fields,
        body: hasBody && bodyAllowed ? this.#bodyStream(head, framing) : null,
      });
    } catch (error) {
      throw new HttpError(
        400,
        `Cannot build a Request from ${method} ${url}`,
        { cause: error },
      );
    }
  }

  /**
   * The request body as a stream pulled from the socket only when the
   * handler reads it (highWaterMark 0): an unread body is never read ahead.
   */
  #bodyStream(head: RequestHead, framing: Framing): ReadableStream<Uint8Array> {
    const state = this.#bodyState;
    state.expectContinue = head.version === "HTTP/1.1" &&
      head.fields.expect?.toLowerCase() === "100-continue";
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        if (state.detached) {
          // The connection has moved on to the next request: what is left
          // of this body was discarded, so reading on would lose data.
          return controller.error(
            new TypeError(
              "Cannot read the request body: the response has already been sent",
            ),
          );
        }
        const next = this.#readBody(framing);
        state.pending = next.catch(() => {});
        try {
          const chunk = await next;
          if (chunk === null) controller.close();
          else controller.enqueue(chunk);
        } catch (error) {
          controller.error(error);
        }
      },
    }, { highWaterMark: 0 });
  }

  /** Next piece of the request body, or null at its end. */
  async #readBody(framing: Framing): Promise<Uint8Array | null> {
    const state = this.#bodyState;
    if (state.error) throw state.error;
    try {
      if (state.expectContinue && !this.#responseStarted) {
        state.expectContinue = false;
        await writeAll(this.#conn, CONTINUE);
      }
      return await nextBodyPiece(framing, this);
    } catch (error) {
      state.error = error instanceof HttpError ? error : new HttpError(
        400,
        "Cannot read the request body: the connection failed",
        { cause: error },
      );
      throw state.error;
    }
  }

  /**
   * One socket read for a request body, bounded by idleTimeout so a client
   * that stops sending in the middle of a body cannot hold the handler
   * forever. The abandoned read is observed; the connection is not reused.
   */
  #readBodyBytes(buffer: Uint8Array): Promise<number | null> {
    const { idleTimeout } = this.#server.settings;
    const read = this.#conn.read(buffer);
    read.catch(() => {});
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new HttpError(
              408,
              `Cannot read the request body: no data came for ${idleTimeout} ms`,
            ),
          ),
        idleTimeout,
      );
    });
    return Promise.race([read, expired]).finally(() => clearTimeout(timer));
  }

  get maxTrailerBytes(): number {
    return this.#server.settings.maxHeadBytes;
  }

  /** Up to `max` bytes: buffered ones first, else one socket read; null at EOF. */
  async take(max: number): Promise<Uint8Array | null> {
    if (this.#buffered.length === 0) {
      const buffer = new Uint8Array(Math.min(max, BODY_READ_SIZE));
      const n = await this.#readBodyBytes(buffer);
      if (n === null) return null;
      if (n <= max) return buffer.subarray(0, n);
      this.#buffered = buffer.subarray(max, n);
      return buffer.subarray(0, max);
    }
    const piece = this.#buffered.subarray(0, max);
    this.#buffered = this.#buffered.subarray(piece.length);
    return piece;
  }

  /** One CRLF-terminated line (without it), bounded by the request-line limit. */
  async readLine(): Promise<string> {
    const limit = this.#server.settings.maxRequestLineBytes;
    let from = 0;
    for (;;) {
      const lf = this.#buffered.indexOf(0x0a, from);
      if (lf !== -1) {
        if (lf === 0 || this.#buffered[lf - 1] !== 0x0d) {
          throw new HttpError(
            400,
            "Cannot read the request body: a chunk line does not end with CRLF",
          );
        }
        const line = String.fromCharCode(...this.#buffered.subarray(0, lf - 1));
        this.#buffered = this.#buffered.subarray(lf + 1);
        return line;
      }
      if (this.#buffered.length > limit) {
        throw new HttpError(
          400,
          "Cannot read the request body: a chunk line is too long",
        );
      }
      from = this.#buffered.length;
      const buffer = new Uint8Array(4096);
      const n = await this.#readBodyBytes(buffer);
      if (n === null) throw truncatedBody();
      const joined = new Uint8Array(this.#buffered.length + n);
      joined.set(this.#buffered);
      joined.set(buffer.subarray(0, n), this.#buffered.length);
      this.#buffered = joined;
    }
  }

  /** Calls the handler and writes its response; resolves keep-alive. */
  async #respond(
    head: RequestHead,
    framing: Framing,
    request: Request,
  ): Promise<boolean> {
    const completed = Promise.withResolvers<void>();
    const info: ServeHandlerInfo = {
      remoteAddr: this.#conn.remoteAddr as Deno.NetAddr,
      completed: completed.promise,
    };
    let handling = true;
    const takeover = new Takeover(this.#server, head);
    registerConnection(request, () => {
      if (!handling || this.#closed || this.#taken) return undefined;
      return this.#handOver(takeover);
    });
    // A handler that serves its WebSocket until it closes would keep this
    // object, its buffers and the request loop alive for as long (several
    // KiB per idle connection): stop waiting once the connection is taken.
    const wait = abandonable(
      callHandler(this.#server.handler, request, info),
      takeover,
    );
    // The handler may have taken it before its first await.
    if (this.#taken) wait.abandon();
    else this.#onTaken = wait.abandon;
    let response: Response | void;
    try {
      response = await wait.settled;
    } catch (error) {
      response = this.#taken ? undefined : await this.#failure(error, head);
    } finally {
      handling = false;
      this.#onTaken = undefined;
    }
    try {
      if (this.#taken) return false;
      if (!(response instanceof Response) || response.status < 200) {
        response = await this.#failure(
          new TypeError(
            response instanceof Response
              ? `Cannot send the response: status ${response.status} needs an upgrade the handler did not do`
              : "Cannot send the response: the handler returned no Response and did not take the connection",
          ),
          head,
        );
      }
      if (response.type === "error") return false;
      const state = this.#bodyState;
      // A client that waits for 100 Continue may never send the body it
      // announced: the connection cannot be reused (RFC 9110 section 10.1.1).
      const bodyUnsent = state.expectContinue && !bodyFinished(framing);
      let keepAlive = wantsKeepAlive(head) && !this.#server.closing &&
        !bodyUnsent && state.error === undefined;
      this.#responseStarted = true;
      keepAlive = await writeResponse(this.#conn, response, keepAlive, {
        head,
        fallback: (error) => this.#failure(error, head),
        onBroken: () => this.#requestAbort?.abort(),
      });
      this.#responseDone = true;
      state.detached = true;
      if (!keepAlive) {
        if (!bodyFinished(framing) || this.#buffered.length > 0) {
          await this.#lingeringClose();
        }
        return false;
      }
      await state.pending;
      return await this.#discardBody(framing);
    } finally {
      completed.resolve();
    }
  }

  async #failure(error: unknown, head: RequestHead): Promise<Response> {
    const bodyError = this.#bodyState.error;
    if (bodyError !== undefined) return plainResponse(bodyError.status);
    return await this.#server.errorResponse(error, head);
  }

  #handOver(takeover: Takeover): HijackedConnection {
    this.#taken = true;
    this.#onTaken?.();
    this.#server.forget(this);
    const head = this.#buffered;
    this.#buffered = new Uint8Array(0);
    // `track` must not hold this HttpConnection, which is done with.
    return {
      conn: this.#conn,
      head,
      track: (closer) => takeover.track(closer),
      untrack: this.#server.untrack,
    };
  }

  /** Reads and drops what is left of a request body, if that is cheap. */
  async #discardBody(framing: Framing): Promise<boolean> {
    let discarded = 0;
    try {
      while (!bodyFinished(framing)) {
        const piece = await this.#readBody(framing);
        if (piece === null) break;
        discarded += piece.length;
        if (discarded > MAX_DRAIN_BYTES) return false;
      }
      return true;
    } catch {
      return false;
    }
  }

  /** Answers a request that cannot be served with a bare status, then closes. */
  async #refuse(status: number): Promise<void> {
    this.#idle = false;
    try {
      await writeAll(this.#conn, encodeRefusal(status));
    } catch {
      return; // The client is gone: nothing more to do.
    }
    await this.#lingeringClose();
  }

  /** Ends a connection whose client may still be sending (see lingeringClose). */
  async #lingeringClose(): Promise<void> {
    this.#idle = false;
    await lingeringClose(this.#conn);
    this.close();
  }
}

/** Keep-alive by default in HTTP/1.1, on request in HTTP/1.0 (RFC 9112 9.3). */
function wantsKeepAlive(head: RequestHead): boolean {
  if (listHasToken(head.fields.connection, "close")) return false;
  return head.version === "HTTP/1.1" ||
    listHasToken(head.fields.connection, "keep-alive");
}

// A Host is a reg-name, IPv4 or bracketed IPv6 literal with an optional port
// (RFC 3986 section 3.2.2); nothing that could move the path or userinfo.
const HOST =
  /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::\d{0,5})?$/;

/** The absolute URL of a request (RFC 9112 section 3.3). */
function requestUrl(
  head: RequestHead,
  scheme: "http" | "https",
  local: Deno.Addr,
): string {
  const target = head.target;
  if (/^https?:\/\//i.test(target)) {
    try {
      return new URL(target).href;
    } catch (error) {
      throw new HttpError(
        400,
        "Cannot read the request: its absolute target is not a valid URL",
        { cause: error },
      );
    }
  }
  let path = target;
  if (target === "*" && head.method === "OPTIONS") path = "/*";
  else if (target[0] !== "/") {
    throw new HttpError(
      400,
      `Cannot read the request: target ${
        JSON.stringify(target.slice(0, 64))
      } is neither a path nor an absolute URL`,
    );
  }
  let host = head.fields.host ?? "";
  if (host === "") {
    const addr = local as Deno.NetAddr;
    host = addr.hostname.includes(":")
      ? `[${addr.hostname}]:${addr.port}`
      : `${addr.hostname}:${addr.port}`;
  } else if (!HOST.test(host)) {
    throw new HttpError(
      400,
      `Cannot read the request: Host ${
        JSON.stringify(host.slice(0, 64))
      } is not a valid host`,
    );
  }
  try {
    return new URL(`${scheme}://${host}${path}`).href;
  } catch (error) {
    throw new HttpError(
      400,
      "Cannot read the request: its Host and target do not form a valid URL",
      { cause: error },
    );
  }
}
