// Shared by the reliability suites: a child-process echo server
// (echo_server.ts) driven over its standard input and output, and a raw
// WebSocket client handshake for clients that then misbehave on purpose.

import { concat, FrameReader, parseClose } from "../_frames.ts";
import { writeAll } from "../_helpers.ts";

/** What the child server's "stats" command answers. */
export interface ServerStats {
  rss: number;
  heapUsed: number;
  external: number;
  gc: boolean;
  open: number;
  upgraded: number;
  echoed: number;
  outcomes: Record<string, string>;
}

/** Options of {@linkcode ServerProcess.start}. */
export interface ServerProcessOptions {
  /** Passed to echo_server.ts as its JSON argument. */
  config?: Record<string, unknown>;
  /** Raise the child's open file limit to this (bash `ulimit -n`). */
  fileLimit?: number;
}

/** The echo server in a child process (see echo_server.ts). */
export class ServerProcess implements AsyncDisposable {
  readonly port: number;
  #child: Deno.ChildProcess;
  #stdin: WritableStreamDefaultWriter<Uint8Array>;
  #lines: AsyncIterator<string>;
  #done = false;

  private constructor(
    child: Deno.ChildProcess,
    lines: AsyncIterator<string>,
    port: number,
  ) {
    this.#child = child;
    this.#stdin = child.stdin.getWriter();
    this.#lines = lines;
    this.port = port;
  }

  static async start(
    options: ServerProcessOptions = {},
  ): Promise<ServerProcess> {
    const script = new URL("./echo_server.ts", import.meta.url).pathname;
    const command = [
      fileLimitCommand(options.fileLimit),
      `exec "${Deno.execPath()}" run -A --v8-flags=--expose-gc`,
      `"${script}" '${JSON.stringify(options.config ?? {})}'`,
    ].join(" ");
    const child = new Deno.Command("bash", {
      args: ["-c", command],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const lines = readLines(child.stdout);
    const first = await lines.next();
    if (first.done) {
      await child.status;
      throw new Error(
        "Cannot start the echo server: it exited before listening",
      );
    }
    const { port } = JSON.parse(first.value);
    return new ServerProcess(child, lines, port);
  }

  /** Sends a command and returns its one-line JSON answer. */
  async command<T>(command: string): Promise<T> {
    await this.#stdin.write(new TextEncoder().encode(command + "\n"));
    const line = await this.#lines.next();
    if (line.done) {
      throw new Error(`Cannot run "${command}": the server exited`);
    }
    return JSON.parse(line.value) as T;
  }

  /** Memory after GC, open connections and per-connection outcomes. */
  stats(): Promise<ServerStats> {
    return this.command<ServerStats>("stats");
  }

  /** Polls stats until no connection is open (or `timeout` ms passed). */
  async settled(timeout = 5000): Promise<ServerStats> {
    const until = Date.now() + timeout;
    while (true) {
      const stats = await this.stats();
      if (stats.open === 0 || Date.now() > until) return stats;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Shuts the server down gracefully and waits for the process to exit. */
  async shutdown<T>(): Promise<T> {
    const answer = await this.command<T>("shutdown");
    await this.#finish();
    return answer;
  }

  async #finish(): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    await this.#stdin.close().catch(() => {});
    // Drain stdout to its end so the stream resource is released.
    while (!(await this.#lines.next()).done);
    await this.#child.status;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#done) return;
    // Closing standard input ends the server's command loop; if it is
    // still serving, kill it.
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // Already exited.
    }
    await this.#finish();
  }
}

/**
 * A bash prefix raising the soft open file limit to `limit`, or to the hard
 * limit when that is lower (raising it needs no privilege up to there).
 */
export function fileLimitCommand(limit = 1024): string {
  return `h=$(ulimit -Hn); if [ "$h" = unlimited ] || [ "$h" -ge ${limit} ]; ` +
    `then ulimit -n ${limit}; else ulimit -n "$h"; fi &&`;
}

export async function* readLines(stream: ReadableStream<Uint8Array>) {
  let pending = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    let newline;
    while ((newline = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, newline);
      pending = pending.slice(newline + 1);
    }
  }
  if (pending) yield pending;
}

/** A client-side raw socket after a handshake (or an attempt at one). */
export interface RawClient {
  conn: Deno.TcpConn;
  /** The response status, or 0 when the server closed without one. */
  status: number;
  /** The response head's text. */
  head: string;
  /** Reads frames, starting with bytes that arrived behind the head. */
  frames: FrameReader;
}

/** A valid upgrade request head for `path`, with `extra` header lines. */
export function upgradeRequest(path: string, extra: string[] = []): string {
  return [
    `GET /${encodeURIComponent(path)} HTTP/1.1`,
    "Host: 127.0.0.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
    ...extra,
    "",
    "",
  ].join("\r\n");
}

/**
 * Reads a response head from `conn` and wraps what follows it. Resolves
 * with status 0 if the server closes before a full head.
 */
export async function readResponse(conn: Deno.TcpConn): Promise<RawClient> {
  let buffered: Uint8Array = new Uint8Array(0);
  let end = -1;
  const chunk = new Uint8Array(4096);
  while (end < 0) {
    let n: number | null;
    try {
      n = await conn.read(chunk);
    } catch {
      n = null;
    }
    if (n === null) break;
    buffered = concat(buffered, chunk.subarray(0, n));
    end = new TextDecoder().decode(buffered).indexOf("\r\n\r\n");
  }
  if (end < 0) {
    return { conn, status: 0, head: "", frames: new FrameReader(conn) };
  }
  const head = new TextDecoder().decode(buffered.subarray(0, end));
  let rest: Uint8Array | undefined = buffered.subarray(end + 4);
  const source = {
    read(buffer: Uint8Array): Promise<number | null> {
      if (rest !== undefined && rest.length > 0) {
        const n = Math.min(rest.length, buffer.length);
        buffer.set(rest.subarray(0, n));
        rest = rest.subarray(n);
        return Promise.resolve(n);
      }
      return conn.read(buffer);
    },
  };
  const status = Number(head.split(" ")[1]);
  return { conn, status, head, frames: new FrameReader(source) };
}

/** Connects and completes a WebSocket handshake by hand. */
export async function rawHandshake(
  port: number,
  path: string,
  extra: string[] = [],
): Promise<RawClient> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await writeAll(conn, upgradeRequest(path, extra));
  return await readResponse(conn);
}

/**
 * Reads frames until a close frame (its code) or EOF (null), skipping
 * others; counts the skipped frames by opcode.
 */
export async function readUntilClose(
  frames: FrameReader,
  seen: Map<number, number> = new Map(),
): Promise<number | null> {
  while (true) {
    const f = await frames.next();
    if (f === null) return null;
    if (f.opcode === 8) return parseClose(f.payload).code;
    seen.set(f.opcode, (seen.get(f.opcode) ?? 0) + 1);
  }
}
