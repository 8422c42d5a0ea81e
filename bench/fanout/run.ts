// Fan-out benchmark: one publish reaching 1,000 and 10,000 subscribers, on
// this library's Topics (bench/fanout/ours.ts) and, side by side, on Bun's
// built-in pub/sub (bench/fanout/bun.ts) when a Bun binary is given.
//
//   taskset -c 1 deno run -A bench/fanout/run.ts [--bun PATH] [--reps 3]
//
// Each server runs pinned to CPU 0 (with taskset, when there is one). The
// subscribers are raw sockets that only count bytes, so the load side
// parses nothing. A publisher sends 32-byte text messages in windows of 50
// (well under any queue bound) and waits for every subscriber to have all
// of a window before the next; deliveries per second = subscribers x
// messages / time. Memory: the server's RSS growth over the subscribers'
// connecting, per subscriber.
//
// Then across processes: 2 and 4 processes of ours.ts on one redis-server
// (Debian's, on a free port), 1,000 subscribers spread over them, the
// publisher on the first; every delivery but the first process's went
// through Redis. On a 2-core machine the processes share the cores with
// each other and the load side, so this shows the cost of the trip through
// Redis, not a speed-up.
import { parseArgs } from "node:util";
import { Dialer, MESSAGE_TYPE } from "../../mod.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    bun: { type: "string" },
    reps: { type: "string", default: "3" },
    messages: { type: "string", default: "500" },
  },
});
const REPS = Number(values.reps);
const MESSAGES = Number(values.messages);
const WINDOW = 50;
const SIZE = 32;
const FRAME = 2 + SIZE; // what a server sends for a 32-byte text message
const here = new URL(".", import.meta.url).pathname;

interface Server {
  name: string;
  command: string[];
}
const servers: Server[] = [
  {
    name: "this library (Topics)",
    command: [Deno.execPath(), "run", "-A", `${here}ours.ts`],
  },
];
if (values.bun) {
  servers.push({
    name: "Bun (server.publish)",
    command: [values.bun, `${here}bun.ts`],
  });
}

async function hasTaskset(): Promise<boolean> {
  try {
    return (await new Deno.Command("taskset", {
      args: ["-V"],
      stdout: "null",
      stderr: "null",
    }).output()).success;
  } catch {
    return false;
  }
}
const pin = await hasTaskset();

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  return port;
}

async function start(server: Server, extra: string[] = [], pinned = pin) {
  const port = freePort();
  const [program, ...args] = pinned
    ? ["taskset", "-c", "0", ...server.command]
    : server.command;
  const child = new Deno.Command(program, {
    args: [...args, String(port), ...extra],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  while (!printed.includes("listening")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`${server.name} did not start`);
    printed += value;
  }
  reader.releaseLock();
  child.stdout.cancel().catch(() => {});
  return { child, port };
}

/** The RSS of `pid`'s process tree (a taskset wrapper execs, so one). */
async function rss(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

/** A subscriber: a raw socket after the handshake, counting what arrives. */
class Subscriber {
  static received = 0;
  static wake: (() => void) | undefined;

  static async open(port: number): Promise<Deno.TcpConn> {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    const key = btoa(
      String.fromCharCode(...crypto.getRandomValues(new Uint8Array(16))),
    );
    await conn.write(new TextEncoder().encode(
      `GET / HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\n` +
        `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    ));
    // The 101 head, then count frames' bytes from here on.
    const buffer = new Uint8Array(64 * 1024);
    let head = "";
    let extra = 0;
    while (!head.includes("\r\n\r\n")) {
      const n = await conn.read(buffer);
      if (n === null) throw new Error("the server closed during the handshake");
      head += new TextDecoder().decode(buffer.subarray(0, n));
      const end = head.indexOf("\r\n\r\n");
      if (end >= 0) extra = head.length - end - 4;
    }
    if (!head.startsWith("HTTP/1.1 101")) throw new Error(`refused: ${head}`);
    Subscriber.count(extra);
    (async () => {
      try {
        for (let n; (n = await conn.read(buffer)) !== null;) {
          Subscriber.count(n);
        }
      } catch {
        // Closed at the end of the run.
      }
    })();
    return conn;
  }

  static count(n: number): void {
    Subscriber.received += n;
    Subscriber.wake?.();
  }

  static async until(bytes: number): Promise<void> {
    while (Subscriber.received < bytes) {
      await new Promise<void>((resolve) => Subscriber.wake = resolve);
    }
  }
}

/**
 * Sends MESSAGES from a publisher on `port` and resolves deliveries per
 * second once the `subscribers` sockets have received them all.
 */
async function publishAll(port: number, subscribers: number): Promise<number> {
  const { conn: publisher } = await new Dialer().dial(
    `ws://127.0.0.1:${port}/`,
  );
  const payload = "m".repeat(SIZE);
  Subscriber.received = 0;
  const started = performance.now();
  for (let sent = 0; sent < MESSAGES; sent += WINDOW) {
    for (let i = 0; i < WINDOW; i++) {
      publisher.writeMessage(MESSAGE_TYPE.Text, payload).catch(() => {});
    }
    await Subscriber.until((sent + WINDOW) * subscribers * FRAME);
  }
  const seconds = (performance.now() - started) / 1000;
  publisher.close();
  return (MESSAGES * subscribers) / seconds;
}

async function run(server: Server, subscribers: number) {
  const { child, port } = await start(server);
  try {
    await new Promise((resolve) => setTimeout(resolve, 500));
    const before = await rss(child.pid);
    Subscriber.received = 0;
    const sockets: Deno.TcpConn[] = [];
    for (let i = 0; i < subscribers; i += 100) {
      const batch = Math.min(100, subscribers - i);
      sockets.push(
        ...await Promise.all(
          Array.from({ length: batch }, () => Subscriber.open(port)),
        ),
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const after = await rss(child.pid);
    const deliveries = await publishAll(port, subscribers);
    for (const socket of sockets) socket.close();
    return {
      deliveries,
      kibPerSubscriber: (after - before) / subscribers / 1024,
    };
  } finally {
    child.kill("SIGTERM");
    await child.status;
  }
}

const median = (xs: number[]) =>
  [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rows: string[] = [];
for (const subscribers of [1000, 10_000]) {
  for (const server of servers) {
    const results = [];
    for (let rep = 0; rep < REPS; rep++) {
      results.push(await run(server, subscribers));
    }
    const d = results.map((r) => r.deliveries);
    const m = results.map((r) => r.kibPerSubscriber);
    rows.push(
      `| ${server.name} | ${subscribers} | ${
        Math.round(median(d)).toLocaleString("en")
      } ` +
        `(${Math.round(Math.min(...d)).toLocaleString("en")}-${
          Math.round(Math.max(...d)).toLocaleString("en")
        }) ` +
        `| ${median(m).toFixed(1)} (${Math.min(...m).toFixed(1)}-${
          Math.max(...m).toFixed(1)
        }) |`,
    );
    console.error(rows.at(-1));
  }
}
/** `processes` of ours.ts on one Redis; resolves deliveries per second. */
async function runCluster(
  processes: number,
  subscribers: number,
): Promise<number> {
  const redisPort = freePort();
  const redis = new Deno.Command("redis-server", {
    args: ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", ""],
    stdout: "null",
  }).spawn();
  const started: Awaited<ReturnType<typeof start>>[] = [];
  try {
    for (let tries = 0;; tries++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port: redisPort }))
          .close();
        break;
      } catch (error) {
        if (tries === 100) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    for (let i = 0; i < processes; i++) {
      const url = `redis://127.0.0.1:${redisPort}`;
      started.push(await start(servers[0], [url], false));
    }
    Subscriber.received = 0;
    const sockets = [];
    for (let i = 0; i < subscribers; i++) {
      sockets.push(await Subscriber.open(started[i % processes].port));
    }
    // Each process subscribes to the topic in Redis with its first client.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const deliveries = await publishAll(started[0].port, subscribers);
    for (const socket of sockets) socket.close();
    return deliveries;
  } finally {
    for (const { child } of started) {
      child.kill("SIGTERM");
      await child.status;
    }
    redis.kill("SIGTERM");
    await redis.status;
  }
}

const clusterRows: string[] = [];
for (const processes of [2, 4]) {
  const d = [];
  for (let rep = 0; rep < REPS; rep++) {
    d.push(await runCluster(processes, 1000));
  }
  clusterRows.push(
    `| ${processes} | 1000 | ${Math.round(median(d)).toLocaleString("en")} (${
      Math.round(Math.min(...d)).toLocaleString("en")
    }-${Math.round(Math.max(...d)).toLocaleString("en")}) |`,
  );
  console.error(clusterRows.at(-1));
}

console.log(
  `\n| server | subscribers | deliveries/s, median (min-max) | server KiB per subscriber |\n|---|---:|---:|---:|\n${
    rows.join("\n")
  }\n\n| processes through Redis | subscribers | deliveries/s, median (min-max) |\n|---:|---:|---:|\n${
    clusterRows.join("\n")
  }\n\n${REPS} runs each, ${MESSAGES} messages of ${SIZE} B in windows of ${WINDOW}; Deno ${Deno.version.deno}.`,
);
