// Test helpers shared across the suites: Conns on either end of an in-memory
// pipe or a loopback TCP connection, the test data they exchange, raw socket
// chores, and running a Deno script in a child process. Frame-level helpers
// live in _frames.ts; the reliability suites' child-process server in
// _reliability/helpers.ts.

import assert from "node:assert/strict";
import { Conn, type ConnOptions } from "../conn.ts";
import { createPipe, type Delivery, prng } from "../_pipe.ts";
import {
  FrameReader,
  frames,
  OP,
  parseClose,
  type RawFrame,
  type ReadFrame,
  utf8,
} from "./_frames.ts";

/** The side a Conn plays. */
export type Role = "server" | "client";

/** Both roles, for tests that run once per role. */
export const ROLES: readonly Role[] = ["server", "client"];

/**
 * A Conn on one end of a pipe and the raw other end, as its peer: `send`
 * writes frames (masked towards a server, RFC 6455 section 5.1), `reader`
 * reads what the Conn sent.
 */
export function rawPeer(role: Role, options: {
  delivery?: Delivery;
  capacity?: number;
  conn?: Partial<ConnOptions>;
} = {}) {
  const [local, remote] = createPipe({
    delivery: options.delivery,
    capacity: options.capacity,
  });
  const conn = new Conn(local, { role, ...options.conn });
  const send = (...specs: RawFrame[]) =>
    remote.write(
      frames(...specs.map((s) => ({ mask: role === "server", ...s }))),
    );
  return { conn, local, remote, send, reader: new FrameReader(remote) };
}

/** Two Conns (server and client) over one pipe, with the same options. */
export function connPair(
  delivery: Delivery = "whole",
  options: Partial<ConnOptions> = {},
) {
  const [a, b] = createPipe({ delivery });
  return {
    server: new Conn(a, { role: "server", ...options }),
    client: new Conn(b, { role: "client", ...options }),
    a,
    b,
  };
}

/** Both ends of one loopback TCP connection: the accepted one first. */
export async function tcpSockets(): Promise<[Deno.TcpConn, Deno.TcpConn]> {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return await Promise.all([
    listener.accept(),
    Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
  ]);
}

/** Two Conns over one loopback TCP connection. */
export async function tcpConnPair() {
  const [serverSocket, clientSocket] = await tcpSockets();
  return {
    server: new Conn(serverSocket, { role: "server" }),
    client: new Conn(clientSocket, { role: "client" }),
    serverSocket,
    clientSocket,
  };
}

/**
 * Expects the peer to receive a close frame with `code` and a reason, then
 * EOF.
 *
 * @returns The close frame's code and reason.
 */
export async function expectClose(reader: FrameReader, code: number) {
  let close: ReadFrame | null = null;
  for (let f; (f = await reader.next()) !== null;) {
    if (f.opcode === OP.close) {
      close = f;
      break;
    }
  }
  assert.ok(close, "a close frame was sent");
  const parsed = parseClose(close.payload);
  assert.equal(parsed.code, code, parsed.reason);
  assert.ok(parsed.reason.length > 0, "the close frame gives a reason");
  assert.equal(await reader.next(), null, "the transport is closed after it");
  return parsed;
}

/** Bytes that barely compress, the same for the same size and seed. */
export function pattern(size: number, seed = size): Uint8Array {
  const random = prng(seed);
  return new Uint8Array(size).map(() => random() * 256);
}

/**
 * Text of exactly `size` UTF-8 bytes that cycles through 1- to 4-byte
 * characters, so any cut is likely to fall inside a character.
 */
export function textOf(size: number): string {
  const cycle = "aé✓😀"; // 1 + 2 + 3 + 4 = 10 bytes
  const rest = size % 10;
  // The longest start of the cycle that fits in the rest, padded with ASCII.
  const start = rest >= 6 ? "aé✓" : rest >= 3 ? "aé" : rest >= 1 ? "a" : "";
  return cycle.repeat(Math.floor(size / 10)) + start +
    "z".repeat(rest - utf8(start).length);
}

/** JSON-like text: compresses well, like most WebSocket traffic. */
export function jsonText(size: number): string {
  let text = "";
  for (let i = 0; text.length < size; i++) {
    text += JSON.stringify({ id: i, user: `user${i % 97}`, on: i % 3 === 0 });
  }
  return text.slice(0, size);
}

/**
 * Writes all of `data` (a string as UTF-8), however many calls the socket
 * needs.
 */
export async function writeAll(
  conn: Deno.Conn,
  data: Uint8Array | string,
): Promise<void> {
  if (typeof data === "string") data = utf8(data);
  for (let offset = 0; offset < data.length;) {
    offset += await conn.write(data.subarray(offset));
  }
}

/** Reads until EOF, ignoring everything (and read errors). */
export async function drain(conn: Deno.Conn): Promise<void> {
  const buffer = new Uint8Array(64 * 1024);
  try {
    while ((await conn.read(buffer)) !== null);
  } catch {
    // A reset ends it too.
  }
}

/** Closes a connection or listener that may already be closed. */
export function closeQuietly(closer: { close(): void }): void {
  try {
    closer.close();
  } catch {
    // Already closed.
  }
}

/** Bytes in MiB with one decimal, for the measurements the suites log. */
export function mib(bytes: number): string {
  return (bytes / 1024 / 1024).toFixed(1);
}

/**
 * Runs a Deno script in a child process (`deno run -A`, plus `flags`) and
 * parses the JSON it prints: for measurements that need a process of their
 * own (peak memory, forced GC).
 *
 * @throws {AssertionError} If the script does not exit with status 0; its
 * standard error is the message.
 */
export async function runJsonScript<T>(
  script: string | URL,
  args: string[],
  flags: string[] = [],
): Promise<T> {
  const path = script instanceof URL ? script.pathname : script;
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...flags, path, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  assert.equal(code, 0, decoder.decode(stderr));
  return JSON.parse(decoder.decode(stdout));
}

/**
 * Collects what the example servers hand to their `onConnection` hook, so a
 * test can wait until the server is done with every connection.
 */
export class Sessions {
  #done: Promise<void>[] = [];
  /** Every connection accepted so far. */
  readonly conns: Conn[] = [];
  /** The hook to pass as `onConnection`. */
  readonly onConnection = (conn: Conn, done: Promise<void>): void => {
    this.conns.push(conn);
    this.#done.push(done);
  };
  /** Resolves once the server is done with every connection so far. */
  async settled(): Promise<void> {
    await Promise.all(this.#done);
  }
}
