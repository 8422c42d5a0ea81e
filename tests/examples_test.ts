// The example programs, run in-process: each server is started on port 0
// through its exported startServer() and exercised over real sockets with
// Deno's built-in WebSocket, our Dialer, or raw frames where a test needs to
// misbehave. Every test waits for the server to finish with each connection
// (the examples' onConnection hook) so the sanitizers see nothing left over.
import assert from "node:assert/strict";
import { MESSAGE_TYPE } from "../conn.ts";
import { Dialer } from "../dialer.ts";
import { serve, Upgrader } from "../upgrader.ts";
import { startServer as startAutobahn } from "../examples/autobahn/server.ts";
import { runSuite } from "../examples/autobahn/client.ts";
import { startServer as startChat } from "../examples/chat/server.ts";
import { startServer as startCommand } from "../examples/command/server.ts";
import { startServer as startEcho } from "../examples/echo/server.ts";
import { startServer as startFilewatch } from "../examples/filewatch/server.ts";
import zlib from "node:zlib";
import { clientFrame, frame, FrameReader, OP, parseClose } from "./_frames.ts";
import { Sessions } from "./_helpers.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Rejects when `promise` has not settled within `ms`, so a server that hangs
 * fails the test instead of hanging the suite.
 */
async function within<T>(
  promise: Promise<T>,
  what: string,
  ms = 10_000,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`Timed out after ${ms} ms waiting for ${what}`)),
      ms,
    );
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A browser-like client: Deno's built-in WebSocket with a message queue. */
class Client {
  readonly ws: WebSocket;
  readonly closed: Promise<CloseEvent>;
  #messages: (string | ArrayBuffer)[] = [];
  #waiting: ((value: string | ArrayBuffer) => void) | undefined;

  private constructor(ws: WebSocket) {
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    this.closed = new Promise((resolve) => ws.onclose = resolve);
    ws.onmessage = (event) => {
      const waiting = this.#waiting;
      this.#waiting = undefined;
      if (waiting) waiting(event.data);
      else this.#messages.push(event.data);
    };
  }

  static async connect(url: string): Promise<Client> {
    const client = new Client(new WebSocket(url));
    const open = new Promise<void>((resolve, reject) => {
      client.ws.onopen = () => resolve();
      client.ws.onerror = () =>
        reject(new Error(`Cannot connect to ${url}: the handshake failed`));
    });
    try {
      await within(open, `the handshake with ${url}`);
    } catch (error) {
      client.ws.close();
      await client.closed;
      throw error;
    }
    return client;
  }

  /** The next message, or a rejection if the connection closes first. */
  next(): Promise<string | ArrayBuffer> {
    const queued = this.#messages.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    return within(
      Promise.race([
        new Promise<string | ArrayBuffer>((resolve) => this.#waiting = resolve),
        this.closed.then((event) => {
          throw new Error(`Connection closed (${event.code}) before a message`);
        }),
      ]),
      "a message",
    );
  }

  async nextText(): Promise<string> {
    const message = await this.next();
    assert.equal(typeof message, "string", "expected a text message");
    return message as string;
  }

  async close(): Promise<CloseEvent> {
    this.ws.close();
    return await within(this.closed, "the closing handshake");
  }
}

/** Opens a WebSocket by hand and returns the raw socket after the 101. */
async function rawUpgrade(
  port: number,
  path: string,
  extensions?: string,
): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const key = btoa(
    String.fromCharCode(...crypto.getRandomValues(new Uint8Array(16))),
  );
  await conn.write(encoder.encode(
    `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
      (extensions ? `Sec-WebSocket-Extensions: ${extensions}\r\n` : "") +
      `Sec-WebSocket-Version: 13\r\n\r\n`,
  ));
  let head = "";
  const buffer = new Uint8Array(1);
  // Byte by byte so nothing past the head is consumed.
  while (!head.endsWith("\r\n\r\n")) {
    const n = await conn.read(buffer);
    assert.notEqual(n, null, "the server closed during the handshake");
    head += String.fromCharCode(buffer[0]);
  }
  assert.match(head, /^HTTP\/1\.1 101 /);
  return conn;
}

/**
 * Reads server frames until EOF; returns the close frame's status code
 * (undefined: the server hung up without one).
 */
async function readCloseCode(conn: Deno.TcpConn): Promise<number | undefined> {
  const frames = new FrameReader(conn);
  let code: number | undefined;
  for (let f; (f = await frames.next()) !== null;) {
    if (f.opcode === OP.close) code ??= parseClose(f.payload).code;
  }
  return code;
}

/** Polls `condition` every 10 ms until it holds or `ms` pass. */
async function until(condition: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!condition()) {
    assert.ok(Date.now() < end, "timed out waiting for a condition");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function bytesOf(message: string | ArrayBuffer): Uint8Array {
  assert.ok(message instanceof ArrayBuffer, "expected a binary message");
  return new Uint8Array(message);
}

const MiB = 1024 * 1024;

/** A loopback port nothing listens on. */
function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  return port;
}

/** The example tasks of deno.json, e.g. `deno run --allow-net ... server.ts`. */
const TASKS: Record<string, string> = JSON.parse(
  await Deno.readTextFile(new URL("../deno.json", import.meta.url)),
).tasks;

/**
 * The files the examples need (the library, deno.json, examples/, redis/) copied to a new directory, as a fresh clone has them: without
 * the node_modules/ the tests' npm packages leave in this checkout.
 */
async function freshCheckout(): Promise<string> {
  const root = new URL("../", import.meta.url);
  const dir = await Deno.makeTempDir();
  const copy = async (from: URL, to: string, pick: RegExp) => {
    await Deno.mkdir(to, { recursive: true });
    for await (const entry of Deno.readDir(from)) {
      if (entry.isDirectory && from.href !== root.href) {
        await copy(
          new URL(`${entry.name}/`, from),
          `${to}/${entry.name}`,
          pick,
        );
      } else if (entry.isFile && pick.test(entry.name)) {
        await Deno.copyFile(new URL(entry.name, from), `${to}/${entry.name}`);
      }
    }
  };
  await copy(root, dir, /\.ts$|^deno\.json$/);
  for (const folder of ["examples", "redis"]) {
    await copy(new URL(`${folder}/`, root), `${dir}/${folder}`, /./);
  }
  return dir;
}

/**
 * Runs an example with `deno task`, on port 0, and waits for the URL it
 * prints. As on a fresh machine with no npm registry: a fresh checkout, an
 * empty Deno cache, and a registry address where nothing listens. An
 * example needs none of them.
 */
async function runTask(name: string, args: string[]) {
  assert.ok(name in TASKS, `no task ${name}`);
  const checkout = await freshCheckout();
  const program = await startProgram(
    ["task", "--quiet", name, "--port", "0", ...args],
    {
      cwd: checkout,
      env: {
        DENO_DIR: `${checkout}/.deno`,
        NPM_CONFIG_REGISTRY: `http://127.0.0.1:${closedPort()}/`,
      },
    },
  );
  return {
    ...program,
    async stop(): Promise<string> {
      const stderr = await program.stop();
      await Deno.remove(checkout, { recursive: true });
      return stderr;
    },
  };
}

/**
 * Runs `deno <args>` until it prints a URL; `pid` is the process's own
 * (for /proc), and `stop()` ends it with SIGTERM and returns its stderr.
 */
async function startProgram(
  args: string[],
  options: { cwd?: string | URL; env?: Record<string, string> } = {},
) {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: options.cwd ?? new URL("..", import.meta.url),
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...options.env },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  let url: URL | undefined;
  while (url === undefined) {
    const { value, done } = await stdout.read();
    if (done) {
      await stdout.cancel();
      const status = await child.status;
      assert.fail(
        `deno ${
          args.join(" ")
        } exited (${status.code}) before printing its URL: ${await stderr}`,
      );
    }
    printed += value;
    const match = /\b(?:http|ws):\/\/\S+/.exec(printed);
    if (match !== null) url = new URL(match[0]);
  }
  return {
    url,
    printed,
    pid: child.pid,
    /** Stops the program (SIGTERM) and returns what it wrote to stderr. */
    async stop(): Promise<string> {
      child.kill("SIGTERM");
      await stdout.cancel();
      await child.status;
      return await stderr;
    },
  };
}

// echo

Deno.test("echo server serves its page on GET / and 404 elsewhere", async () => {
  const server = startEcho({ port: 0 });
  const base = `http://127.0.0.1:${server.addr.port}`;
  const page = await fetch(`${base}/`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get("content-type") ?? "", /^text\/html/);
  assert.match(await page.text(), /new WebSocket\(url\)/);
  const missing = await fetch(`${base}/nope`);
  assert.equal(missing.status, 404);
  await missing.body?.cancel();
  await server.shutdown();
});

Deno.test("echo server echoes text and binary with their type on / and /ws", async () => {
  const sessions = new Sessions();
  const server = startEcho({ port: 0, onConnection: sessions.onConnection });
  for (const path of ["/", "/ws"]) {
    const client = await Client.connect(
      `ws://127.0.0.1:${server.addr.port}${path}`,
    );
    for (const size of [0, 1, 125, 126, 65535, 65536, 1 << 20]) {
      const text = "é".repeat(size >> 1) + "x".repeat(size & 1);
      client.ws.send(text);
      assert.equal(await client.next(), text, `text of ${size} bytes`);
      const binary = new Uint8Array(size).map((_, i) => i * 31 + (i >> 8));
      client.ws.send(binary);
      assert.deepEqual(
        bytesOf(await client.next()),
        binary,
        `binary of ${size} bytes`,
      );
    }
    await client.close();
  }
  await sessions.settled();
  await server.shutdown();
});

Deno.test("echo server outlives garbage, truncated frames and bad handshakes", async () => {
  const sessions = new Sessions();
  const server = startEcho({ port: 0, onConnection: sessions.onConnection });
  const { port } = server.addr;
  // Garbage after the 101: the connection fails with 1002, nothing escapes.
  const garbage = await rawUpgrade(port, "/");
  await garbage.write(new Uint8Array([0x8f, 0x80, 1, 2, 3, 4]));
  assert.equal(await readCloseCode(garbage), 1002);
  garbage.close();
  // EOF in the middle of a frame.
  const truncated = await rawUpgrade(port, "/");
  await truncated.write(clientFrame(0x2, new Uint8Array(100)).subarray(0, 50));
  truncated.close();
  // A handshake without a key is refused with 400.
  const refused = await fetch(`http://127.0.0.1:${port}/ws`, {
    headers: { connection: "upgrade", upgrade: "websocket" },
  });
  assert.equal(refused.status, 400);
  await refused.body?.cancel();
  // The server still echoes.
  const client = await Client.connect(`ws://127.0.0.1:${port}/`);
  client.ws.send("still up");
  assert.equal(await client.next(), "still up");
  await client.close();
  await sessions.settled();
  await server.shutdown();
});

Deno.test("echo server with compress negotiates permessage-deflate", async () => {
  const sessions = new Sessions();
  const server = startEcho({
    port: 0,
    compress: true,
    onConnection: sessions.onConnection,
  });
  const { conn, response } = await new Dialer({ enableCompression: true })
    .dial(`ws://127.0.0.1:${server.addr.port}/`);
  assert.match(
    response.headers.get("sec-websocket-extensions") ?? "",
    /^permessage-deflate/,
  );
  const json = JSON.stringify({ items: Array(100).fill("compressible") });
  await conn.writeMessage(MESSAGE_TYPE.Text, json);
  const { type, data } = await conn.readMessage();
  assert.equal(type, MESSAGE_TYPE.Text);
  assert.equal(decoder.decode(data), json);
  await conn.closeGracefully(1000, "", { timeout: 5000 });
  await sessions.settled();
  await server.shutdown();
});

Deno.test("echo server refuses decompression bombs with 1009, and its memory comes back", async () => {
  // The program itself, so that its RSS is the server's alone.
  const [, ...run] = TASKS.echo.split(" ");
  const program = await startProgram([...run, "--port", "0", "--compress"]);
  const port = Number(program.url.port);
  const rss = async () =>
    Number(
      /VmRSS:\s+(\d+) kB/.exec(
        await Deno.readTextFile(`/proc/${program.pid}/status`),
      )![1],
    ) * 1024;
  // Warm up (JIT, buffers, an inflater) with one ordinary compressed echo.
  const { conn } = await new Dialer({ enableCompression: true })
    .dial(`ws://127.0.0.1:${port}/`);
  await conn.writeMessage(MESSAGE_TYPE.Text, "x".repeat(4096));
  await conn.readMessage();
  await conn.closeGracefully();
  const baseline = await rss();
  // Three clients at once, each with 256 MiB of zeros deflated to ~256 KiB.
  const bomb = await deflatedZeros(256);
  const codes = await Promise.all([0, 1, 2].map(async () => {
    const socket = await rawUpgrade(
      port,
      "/",
      "permessage-deflate; client_no_context_takeover; server_no_context_takeover",
    );
    const mask = crypto.getRandomValues(new Uint8Array(4));
    // The server hangs up midway: the rest of the write fails.
    const sending = writeAll(
      socket,
      frame({ opcode: OP.binary, rsv1: true, payload: bomb, mask }),
    ).catch(() => {});
    const code = await readCloseCode(socket);
    await sending;
    socket.close();
    return code;
  }));
  assert.deepEqual(codes, [1009, 1009, 1009]);
  const after = await rss();
  console.log(
    `echo server RSS: ${(baseline / MiB).toFixed(1)} MiB before three ` +
      `256 MiB bombs, ${(after / MiB).toFixed(1)} MiB after`,
  );
  assert.ok(
    after - baseline < 64 * MiB,
    `RSS grew by ${((after - baseline) / MiB).toFixed(1)} MiB`,
  );
  assert.equal(
    await program.stop(),
    "echo: Cannot read message: it exceeds the read limit of 4194304 bytes (closed with 1009)\n"
      .repeat(3),
  );
});

/** `mib` MiB of zeros deflated (raw, as permessage-deflate sends them). */
async function deflatedZeros(mib: number): Promise<Uint8Array> {
  // Built by zlib in a stream, so the test never holds the inflated bytes.
  const deflater = zlib.createDeflateRaw();
  const parts: Uint8Array<ArrayBuffer>[] = [];
  deflater.on("data", (chunk: Uint8Array) => parts.push(new Uint8Array(chunk)));
  const zeros = new Uint8Array(MiB);
  for (let i = 0; i < mib; i++) deflater.write(zeros);
  await new Promise<void>((resolve) =>
    deflater.flush(zlib.constants.Z_SYNC_FLUSH, () => resolve())
  );
  deflater.close();
  const all = new Uint8Array(await new Blob(parts).arrayBuffer());
  return all.subarray(0, all.length - 4); // RFC 7692 section 7.2.1: no tail
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

// chat

Deno.test("chat broadcasts each line to every client, newlines flattened", async () => {
  const sessions = new Sessions();
  const { server, hub } = startChat({
    port: 0,
    onConnection: sessions.onConnection,
  });
  const url = `ws://127.0.0.1:${server.addr.port}/ws`;
  const alice = await Client.connect(url);
  const bob = await Client.connect(url);
  await until(() => hub.size === 2);
  alice.ws.send("hello\nbob  ");
  assert.equal(await alice.nextText(), "hello bob");
  assert.equal(await bob.nextText(), "hello bob");
  bob.ws.send("hi alice");
  assert.equal(await alice.nextText(), "hi alice");
  assert.equal(await bob.nextText(), "hi alice");
  await alice.close();
  await bob.close();
  await sessions.settled();
  assert.equal(hub.size, 0);
  await server.shutdown();
});

Deno.test("chat closes with 1009 a message over maxMessageSize", async () => {
  const sessions = new Sessions();
  const { server } = startChat({
    port: 0,
    onConnection: sessions.onConnection,
  });
  // A raw socket: Deno's WebSocket reports a failed close reply (code 0)
  // when the server hangs up right after its close frame, as RFC 6455
  // section 7.1.7 lets it.
  const conn = await rawUpgrade(server.addr.port, "/ws");
  await conn.write(clientFrame(0x1, new Uint8Array(513).fill(0x78)));
  assert.equal(await readCloseCode(conn), 1009);
  conn.close();
  await sessions.settled();
  await server.shutdown();
});

Deno.test("chat pings its clients and drops one that stops answering", async () => {
  const sessions = new Sessions();
  const { server, hub } = startChat({
    port: 0,
    pingInterval: 200,
    pongTimeout: 800,
    onConnection: sessions.onConnection,
  });
  // A browser answers pings by itself and stays.
  const browser = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  // A raw socket that never answers is gone after a ping and its timeout.
  const silent = await rawUpgrade(server.addr.port, "/ws");
  await until(() => hub.size === 2);
  const start = Date.now();
  await until(() => hub.size === 1);
  assert.ok(Date.now() - start >= 900, "dropped before the pong timeout");
  // It was told why: 1001, going away.
  assert.equal(await readCloseCode(silent), 1001);
  // Another second later the browser, which answers pings, is still there.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.equal(hub.size, 1);
  browser.ws.send("still here");
  assert.equal(await browser.nextText(), "still here");
  silent.close();
  await browser.close();
  await sessions.settled();
  await server.shutdown();
});

Deno.test("chat drops a client that does not read instead of slowing the others", async () => {
  const sessions = new Sessions();
  const { server, hub } = startChat({
    port: 0,
    sendQueueSize: 8,
    onConnection: sessions.onConnection,
  });
  const fast = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  const stalled = await rawUpgrade(server.addr.port, "/ws");
  await until(() => hub.size === 2);
  // 64 KiB lines, a few at a time, each read by the fast client before the
  // next: the stalled client's socket buffers fill up, then its queue.
  const line = "x".repeat(65536);
  let sent = 0;
  while (hub.size === 2) {
    assert.ok(sent < 4096, "the stalled client was never dropped");
    for (let i = 0; i < 4; i++) hub.broadcast(line), sent++;
    for (let i = 0; i < 4; i++) assert.equal(await fast.nextText(), line);
  }
  // The fast client keeps receiving after the drop.
  hub.broadcast("after");
  assert.equal(await fast.nextText(), "after");
  stalled.close();
  await fast.close();
  await sessions.settled();
  await server.shutdown();
});

// command

Deno.test("command bridges messages to stdin and stdout lines to messages", async () => {
  const sessions = new Sessions();
  const exits: Deno.CommandStatus[] = [];
  const server = startCommand({
    port: 0,
    command: "cat",
    onConnection: sessions.onConnection,
    onExit: (status) => exits.push(status),
  });
  const client = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  client.ws.send("hello");
  assert.equal(await client.nextText(), "hello");
  client.ws.send("two\nlines");
  assert.equal(await client.nextText(), "two");
  assert.equal(await client.nextText(), "lines");
  await client.close();
  await sessions.settled();
  // cat ends by itself when its input closes: no signal needed.
  assert.deepEqual(exits.map((s) => [s.code, s.signal]), [[0, null]]);
  await server.shutdown();
});

Deno.test("command closes with 1000 and the exit code when the process exits", async () => {
  const sessions = new Sessions();
  const server = startCommand({
    port: 0,
    command: Deno.execPath(),
    args: ["eval", "console.log('bye'); console.error('oops'); Deno.exit(3)"],
    onConnection: sessions.onConnection,
  });
  const client = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  const lines = [await client.nextText(), await client.nextText()];
  assert.deepEqual(lines.sort(), ["bye", "oops"]);
  const closed = await client.closed;
  assert.equal(closed.code, 1000);
  assert.equal(closed.reason, "Process exited with code 3");
  await sessions.settled();
  await server.shutdown();
});

Deno.test("command kills a process that outlives its socket", async () => {
  const sessions = new Sessions();
  const exits: Deno.CommandStatus[] = [];
  const server = startCommand({
    port: 0,
    command: Deno.execPath(),
    // Ignores both the end of its input and SIGTERM.
    args: [
      "eval",
      "Deno.addSignalListener('SIGTERM', () => {}); console.log('ready'); setInterval(() => {}, 1000)",
    ],
    killGrace: 100,
    onConnection: sessions.onConnection,
    onExit: (status) => exits.push(status),
  });
  const client = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  assert.equal(await client.nextText(), "ready");
  await client.close();
  await sessions.settled();
  assert.equal(exits.length, 1);
  assert.equal(exits[0].signal, "SIGKILL");
  await server.shutdown();
});

Deno.test("command tells the peer when the command cannot start", async () => {
  const sessions = new Sessions();
  const server = startCommand({
    port: 0,
    command: "/nonexistent/command",
    onConnection: sessions.onConnection,
  });
  const client = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  const closed = await client.closed;
  assert.equal(closed.code, 1011);
  assert.equal(closed.reason, "Cannot start the command");
  await sessions.settled();
  await server.shutdown();
});

// filewatch

Deno.test("filewatch pushes the file on connect and whenever it changes", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/watched.txt`;
  await Deno.writeTextFile(path, "first");
  const sessions = new Sessions();
  const server = startFilewatch({
    port: 0,
    path,
    pollInterval: 20,
    onConnection: sessions.onConnection,
  });
  const client = await Client.connect(`ws://127.0.0.1:${server.addr.port}/ws`);
  assert.deepEqual(JSON.parse(await client.nextText()), {
    name: path,
    contents: "first",
  });
  await Deno.writeTextFile(path, "second, longer");
  assert.deepEqual(JSON.parse(await client.nextText()), {
    name: path,
    contents: "second, longer",
  });
  await Deno.remove(path);
  const gone = JSON.parse(await client.nextText());
  assert.equal(gone.name, path);
  assert.match(gone.error, /No such file/);
  await Deno.writeTextFile(path, "back");
  assert.deepEqual(JSON.parse(await client.nextText()), {
    name: path,
    contents: "back",
  });
  await client.close();
  await sessions.settled();
  await server.shutdown();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("chat and filewatch refuse keepalive timings that cannot work", () => {
  // Checked before listening: nothing is bound, so nothing needs closing.
  assert.throws(
    () => startChat({ port: 0, pongTimeout: 0 }),
    {
      name: "RangeError",
      message:
        "Cannot create the Upgrader: pongTimeout must be a finite number of milliseconds > 0, got 0",
    },
  );
  assert.throws(
    () => startFilewatch({ port: 0, path: "x", pingPeriod: 90_000 }),
    {
      name: "RangeError",
      message:
        "Cannot start the file watch: pingPeriod (90000 ms) must be less than pongWait (60000 ms)",
    },
  );
});

// autobahn

Deno.test("autobahn server echoes on /, /f and /p, and 404s elsewhere", async () => {
  const sessions = new Sessions();
  const server = startAutobahn({
    port: 0,
    onConnection: sessions.onConnection,
  });
  const base = `ws://127.0.0.1:${server.addr.port}`;
  for (const path of ["/", "/f", "/p"]) {
    const client = await Client.connect(`${base}${path}`);
    for (const size of [0, 125, 126, 65536, 300_000]) {
      const text = "ü€𝄞".repeat(Math.ceil(size / 9)).slice(0, size);
      client.ws.send(text);
      assert.equal(await client.next(), text, `${path}: text of ${size}`);
      const binary = new Uint8Array(size).map((_, i) => i * 7);
      client.ws.send(binary);
      assert.deepEqual(
        bytesOf(await client.next()),
        binary,
        `${path}: binary of ${size}`,
      );
    }
    await client.close();
  }
  const missing = await fetch(`http://127.0.0.1:${server.addr.port}/nope`);
  assert.equal(missing.status, 404);
  await missing.body?.cancel();
  await sessions.settled();
  await server.shutdown();
});

Deno.test("autobahn server echoes compressed, fragmented messages on every path", async () => {
  const sessions = new Sessions();
  const server = startAutobahn({
    port: 0,
    onConnection: sessions.onConnection,
  });
  const dialer = new Dialer({ enableCompression: true, writeBufferSize: 1024 });
  const text = JSON.stringify({
    rows: Array(2000).fill({ a: "ünïcode", b: 1 }),
  });
  for (const path of ["/", "/f", "/p"]) {
    const { conn, response } = await dialer.dial(
      `ws://127.0.0.1:${server.addr.port}${path}`,
    );
    assert.match(
      response.headers.get("sec-websocket-extensions") ?? "",
      /^permessage-deflate/,
    );
    // Fragments of at most writeBufferSize bytes, split inside characters.
    const writer = conn.nextWriter(MESSAGE_TYPE.Text);
    const bytes = encoder.encode(text);
    for (let i = 0; i < bytes.length; i += 777) {
      await writer.write(bytes.subarray(i, i + 777));
    }
    await writer.close();
    const echoed = await conn.readMessage();
    assert.equal(echoed.type, MESSAGE_TYPE.Text);
    assert.equal(decoder.decode(echoed.data), text, path);
    await conn.closeGracefully(1000, "", { timeout: 5000 });
  }
  await sessions.settled();
  await server.shutdown();
});

Deno.test("autobahn server streams on /f: the echo starts before the message ends", async () => {
  const sessions = new Sessions();
  const server = startAutobahn({
    port: 0,
    onConnection: sessions.onConnection,
  });
  const { conn } = await new Dialer().dial(
    `ws://127.0.0.1:${server.addr.port}/f`,
  );
  const writer = conn.nextWriter(MESSAGE_TYPE.Binary);
  await writer.write(new Uint8Array(65536).fill(7));
  // The final fragment has not been sent, yet the echo is already arriving.
  const { type, reader } = await within(conn.nextReader(), "the echo to begin");
  assert.equal(type, MESSAGE_TYPE.Binary);
  const buffer = new Uint8Array(65536);
  const n = await within(reader.read(buffer), "echoed bytes");
  assert.ok(n !== null && n > 0);
  assert.ok(buffer.subarray(0, n).every((byte) => byte === 7));
  await writer.write(new Uint8Array([8]));
  await writer.close();
  let total = n;
  let last = 7;
  for (let m; (m = await reader.read(buffer)) !== null;) {
    total += m;
    last = buffer[m - 1];
  }
  assert.equal(total, 65537);
  assert.equal(last, 8);
  await conn.closeGracefully(1000, "", { timeout: 5000 });
  await sessions.settled();
  await server.shutdown();
});

Deno.test("autobahn server fails invalid UTF-8 text with 1007 on every path", async () => {
  const sessions = new Sessions();
  const server = startAutobahn({
    port: 0,
    onConnection: sessions.onConnection,
  });
  for (const path of ["/", "/f", "/p"]) {
    const conn = await rawUpgrade(server.addr.port, path);
    // 0xC0 0xAF is an overlong encoding of "/": never valid UTF-8.
    await conn.write(clientFrame(0x1, new Uint8Array([0x61, 0xc0, 0xaf])));
    assert.equal(await readCloseCode(conn), 1007, path);
    conn.close();
  }
  await sessions.settled();
  await server.shutdown();
});

/**
 * A stand-in for the suite's fuzzingserver: `cases` cases, each sending a
 * text and a binary message and checking the echoes. `log` lists what was
 * done, `offers` the extensions each connection offered.
 */
function startFuzzer(cases: number) {
  const upgrader = new Upgrader({ enableCompression: true });
  const log: string[] = [];
  const offers: string[] = [];
  const work: Promise<void>[] = [];
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      const url = new URL(request.url);
      offers.push(request.headers.get("sec-websocket-extensions") ?? "");
      const conn = await upgrader.upgrade(request);
      const session = (async () => {
        if (url.pathname === "/getCaseCount") {
          await conn.writeMessage(MESSAGE_TYPE.Text, String(cases));
        } else if (url.pathname === "/runCase") {
          const name = `case ${url.searchParams.get("case")} for ${
            url.searchParams.get("agent")
          }`;
          await conn.writeMessage(MESSAGE_TYPE.Text, name);
          const text = await conn.readMessage();
          assert.equal(text.type, MESSAGE_TYPE.Text);
          assert.equal(decoder.decode(text.data), name);
          await conn.writeMessage(
            MESSAGE_TYPE.Binary,
            new Uint8Array([1, 2, 3]),
          );
          const binary = await conn.readMessage();
          assert.equal(binary.type, MESSAGE_TYPE.Binary);
          assert.deepEqual([...binary.data], [1, 2, 3]);
          log.push(name);
        } else {
          log.push(`${url.pathname} ${url.searchParams.get("agent")}`);
        }
        await conn.closeGracefully(1000, "", { timeout: 5000 });
      })();
      work.push(session);
      await session;
    },
  );
  return {
    url: `ws://127.0.0.1:${server.addr.port}`,
    log,
    offers,
    /** Waits for every session (rethrowing a failed check), then stops. */
    async finish(): Promise<void> {
      try {
        await Promise.all(work);
      } finally {
        await server.shutdown();
      }
    },
  };
}

Deno.test("autobahn client runs every case of a fuzzing server, then updates the reports", async () => {
  const fuzzer = startFuzzer(2);
  const seen: string[] = [];
  const count = await runSuite({
    url: fuzzer.url,
    agent: "tester",
    onCase: (index, count) => seen.push(`${index}/${count}`),
  });
  await fuzzer.finish();
  assert.equal(count, 2);
  assert.deepEqual(seen, ["1/2", "2/2"]);
  assert.deepEqual(fuzzer.log, [
    "case 1 for tester",
    "case 2 for tester",
    "/updateReports tester",
  ]);
  // Compression is offered on every connection.
  assert.equal(fuzzer.offers.length, 4);
  for (const offer of fuzzer.offers) assert.match(offer, /^permessage-deflate/);
});

// the programs, as their deno tasks run them

Deno.test("deno task echo starts the echo server and prints its URL", async () => {
  const program = await runTask("echo", []);
  assert.match(program.printed, /^Echo server on http:\/\/127\.0\.0\.1:\d+\//);
  const client = await Client.connect(`ws://${program.url.host}/`);
  client.ws.send("from the command line");
  assert.equal(await client.next(), "from the command line");
  await client.close();
  assert.equal(await program.stop(), "");
});

Deno.test("deno task chat starts the chat server and prints its URL", async () => {
  const program = await runTask("chat", []);
  const client = await Client.connect(`ws://${program.url.host}/ws`);
  client.ws.send("anyone?");
  assert.equal(await client.next(), "anyone?");
  await client.close();
  assert.equal(await program.stop(), "");
});

Deno.test("deno task chat:web starts the upgradeWebSocket chat server", async () => {
  const program = await runTask("chat:web", []);
  assert.match(program.printed, /^Chat on http:\/\/127\.0\.0\.1:\d+\//);
  const client = await Client.connect(`ws://${program.url.host}/ws`);
  client.ws.send("anyone\nthere?");
  assert.equal(await client.next(), "anyone there?");
  await client.close();
  assert.equal(await program.stop(), "");
});

Deno.test("deno task command runs the given command for each connection", async () => {
  const program = await runTask("command", ["--", "cat"]);
  assert.match(program.printed, /Running "cat"/);
  const client = await Client.connect(`ws://${program.url.host}/ws`);
  client.ws.send("meow");
  assert.equal(await client.next(), "meow");
  await client.close();
  await program.stop();
});

Deno.test("deno task command runs a Deno REPL when given no command", async () => {
  const program = await runTask("command", []);
  const client = await Client.connect(`ws://${program.url.host}/ws`);
  client.ws.send("6 * 7");
  let line;
  do line = await client.next(); while (line !== "42");
  await client.close();
  await program.stop();
});

Deno.test("deno task filewatch pushes the named file", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeTextFile(path, "watched");
  const program = await runTask("filewatch", [path]);
  const client = await Client.connect(`ws://${program.url.host}/ws`);
  assert.deepEqual(JSON.parse(await client.nextText()), {
    name: path,
    contents: "watched",
  });
  await client.close();
  assert.equal(await program.stop(), "");
  await Deno.remove(path);
});

Deno.test("deno task autobahn starts the testee server", async () => {
  const program = await runTask("autobahn", []);
  const client = await Client.connect(`ws://${program.url.host}/p`);
  client.ws.send("prepared");
  assert.equal(await client.next(), "prepared");
  await client.close();
  assert.equal(await program.stop(), "");
});

Deno.test("deno task autobahn:client drives a fuzzing server from the command line", async () => {
  const fuzzer = startFuzzer(3);
  const [deno, ...taskArgs] = TASKS["autobahn:client"].split(" ");
  assert.equal(deno, "deno");
  const output = await new Deno.Command(Deno.execPath(), {
    args: [...taskArgs, "--url", fuzzer.url, "--agent", "cli"],
    cwd: new URL("..", import.meta.url),
    env: { NO_COLOR: "1" },
  }).output();
  await fuzzer.finish();
  assert.equal(decoder.decode(output.stderr), "");
  assert.equal(output.code, 0);
  assert.match(
    decoder.decode(output.stdout),
    /Running case 3 of 3\nRan 3 cases; reports updated for cli\n$/,
  );
  assert.deepEqual(fuzzer.log.at(-1), "/updateReports cli");
});
