// A Transport over a node:net socket, so that a node:http server's 'upgrade'
// event (request, socket, head) can hand its connection to the Upgrader.
//
// Only types come from node: here; the socket object itself is driven through
// its own methods, so nothing node-specific is loaded at run time.

import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import type { Transport } from "./conn.ts";

/** The request a node:http server passes to its `'upgrade'` listeners. */
export type NodeRequest = IncomingMessage;

/**
 * The socket a node:http server passes to its `'upgrade'` listeners: a
 * `net.Socket` (or `tls.TLSSocket`) typed as a `stream.Duplex`.
 */
export type NodeSocket = Duplex;

/**
 * Queued but unread bytes above which the socket is paused, so a peer that
 * sends faster than the application reads fills the kernel buffers (TCP flow
 * control) instead of this process's memory.
 */
const HIGH_WATER_MARK = 64 * 1024;

interface PendingRead {
  buffer: Uint8Array;
  resolve(n: number | null): void;
  reject(error: unknown): void;
}

/**
 * Views a node `Buffer` as a plain `Uint8Array`: `Buffer#slice` shares memory
 * where `Uint8Array#slice` copies, and the Conn expects the latter.
 */
function plainBytes(chunk: Uint8Array): Uint8Array {
  return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

/** What reads and writes reject with once the transport is closed, as a `Deno.Conn`'s do. */
function closedError(action: "read from" | "write to"): Error {
  return new Deno.errors.BadResource(
    `Cannot ${action} the socket: the transport is closed`,
  );
}

function socketAddr(
  hostname: string | undefined,
  port: number | undefined,
): Deno.NetAddr | undefined {
  if (hostname === undefined || port === undefined) return undefined;
  return { transport: "tcp", hostname, port };
}

/**
 * A Transport over a node socket. Reads are served from a queue filled by the
 * socket's `'data'` events (the socket is paused while the queue is above
 * {@linkcode HIGH_WATER_MARK}); a write resolves once node has handed the bytes
 * to the OS, so the caller may reuse its buffer. EOF, `'close'` and `'error'`
 * settle pending reads and writes, and an `'error'` listener is always
 * attached, so a dying socket never throws or rejects with nobody listening.
 */
export class NodeTransport implements Transport {
  #socket: NodeSocket;
  #queue: Uint8Array[] = [];
  #queued = 0;
  #paused = false;
  #ended = false;
  #closed = false;
  #error: Error | undefined;
  /** Set once the socket has closed: later writes could never complete. */
  #gone: Error | undefined;
  #pendingRead: PendingRead | undefined;
  #pendingWrites = new Set<(error: Error) => void>();
  readonly localAddr?: Deno.NetAddr;
  readonly remoteAddr?: Deno.NetAddr;

  /**
   * Wraps `socket`, reading `head` (the bytes node read past the request
   * head) before anything the socket delivers.
   */
  constructor(socket: NodeSocket, head: Uint8Array) {
    this.#socket = socket;
    const net = socket as Partial<
      {
        localAddress: string;
        localPort: number;
        remoteAddress: string;
        remotePort: number;
        setNoDelay(noDelay: boolean): void;
        setTimeout(ms: number): void;
      }
    >;
    this.localAddr = socketAddr(net.localAddress, net.localPort);
    this.remoteAddr = socketAddr(net.remoteAddress, net.remotePort);
    // WebSocket frames are latency-sensitive, and node:http's idle timeout
    // must not fire on a connection that is now ours.
    net.setNoDelay?.(true);
    net.setTimeout?.(0);
    if (head.byteLength > 0) this.#enqueue(plainBytes(head));
    socket.on("data", (chunk: Uint8Array) => this.#enqueue(plainBytes(chunk)));
    socket.on("end", () => this.#finish());
    socket.on("error", (error: Error) => this.#fail(error));
    socket.on("close", () => {
      this.#finish();
      this.#gone = this.#error ??
        new Deno.errors.BrokenPipe(
          "Cannot write to the socket: the peer closed the connection",
        );
      this.#failWrites(this.#gone);
    });
  }

  read(buffer: Uint8Array): Promise<number | null> {
    if (this.#pendingRead !== undefined) {
      return Promise.reject(
        new TypeError("Cannot read from the socket: a read is already pending"),
      );
    }
    if (this.#queue.length > 0) {
      return Promise.resolve(this.#take(buffer));
    }
    if (this.#closed) return Promise.reject(closedError("read from"));
    if (this.#error !== undefined) return Promise.reject(this.#error);
    if (this.#ended) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this.#pendingRead = { buffer, resolve, reject };
    });
  }

  write(data: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(closedError("write to"));
    const failed = this.#error ?? this.#gone;
    if (failed !== undefined) return Promise.reject(failed);
    return new Promise((resolve, reject) => {
      const fail = (error: Error) => {
        this.#pendingWrites.delete(fail);
        reject(error);
      };
      this.#pendingWrites.add(fail);
      this.#socket.write(data, (error?: Error | null) => {
        if (!this.#pendingWrites.delete(fail)) return;
        if (error) reject(error);
        else resolve(data.byteLength);
      });
    });
  }

  /** Half-closes the socket: sends FIN but keeps reading (for lingering). */
  closeWrite(): Promise<void> {
    if (!this.#closed) this.#socket.end();
    return Promise.resolve();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue = [];
    this.#queued = 0;
    this.#socket.destroy();
    this.#settleRead();
    this.#failWrites(closedError("write to"));
  }

  #enqueue(chunk: Uint8Array): void {
    if (this.#closed || chunk.byteLength === 0) return;
    this.#queue.push(chunk);
    this.#queued += chunk.byteLength;
    if (this.#queued >= HIGH_WATER_MARK && !this.#paused) {
      this.#paused = true;
      this.#socket.pause();
    }
    this.#settleRead();
  }

  #finish(): void {
    this.#ended = true;
    this.#settleRead();
  }

  #fail(error: Error): void {
    this.#error ??= error;
    this.#settleRead();
    this.#failWrites(error);
  }

  #failWrites(error: Error): void {
    for (const fail of [...this.#pendingWrites]) fail(error);
  }

  /** Completes the pending read, if any, from the current state. */
  #settleRead(): void {
    const pending = this.#pendingRead;
    if (pending === undefined) return;
    if (this.#queue.length > 0) {
      this.#pendingRead = undefined;
      pending.resolve(this.#take(pending.buffer));
    } else if (this.#closed) {
      this.#pendingRead = undefined;
      pending.reject(closedError("read from"));
    } else if (this.#error !== undefined) {
      // A reset is reported as such, even though 'close' follows it.
      this.#pendingRead = undefined;
      pending.reject(this.#error);
    } else if (this.#ended) {
      this.#pendingRead = undefined;
      pending.resolve(null);
    }
  }

  /** Moves queued bytes into `buffer`; resumes the socket once drained. */
  #take(buffer: Uint8Array): number {
    let n = 0;
    while (n < buffer.byteLength && this.#queue.length > 0) {
      const chunk = this.#queue[0];
      const size = Math.min(chunk.byteLength, buffer.byteLength - n);
      buffer.set(chunk.subarray(0, size), n);
      n += size;
      if (size === chunk.byteLength) this.#queue.shift();
      else this.#queue[0] = chunk.subarray(size);
    }
    this.#queued -= n;
    if (this.#paused && this.#queued < HIGH_WATER_MARK / 2) {
      this.#paused = false;
      this.#socket.resume();
    }
    return n;
  }
}

/**
 * Builds the web `Request` the Upgrader validates from a node:http request:
 * the method, the target resolved against its `Host`, and every header line
 * in arrival order (from `rawHeaders`, so repeated fields stay repeated).
 * Returns `undefined` when the request cannot be represented as a `Request`
 * (a forbidden method such as TRACE, or a header value `Headers` refuses).
 */
export function requestFromNode(request: NodeRequest): Request | undefined {
  try {
    const headers = new Headers();
    const raw = request.rawHeaders;
    for (let i = 0; i + 1 < raw.length; i += 2) {
      headers.append(raw[i], raw[i + 1]);
    }
    const target = request.url ?? "/";
    let url: URL;
    try {
      url = new URL(target, `http://${headers.get("host") ?? "localhost"}`);
    } catch {
      // An unparsable Host is the origin check's business, not a reason to
      // lose the request: keep the path on a neutral base.
      url = new URL(target, "http://localhost");
    }
    return new Request(url, { method: request.method ?? "GET", headers });
  } catch {
    return undefined;
  }
}
