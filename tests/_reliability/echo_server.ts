// A serve() + Upgrader echo server run as a child process by the reliability
// suites, so that its memory is measured apart from the clients hammering it
// (run with --v8-flags=--expose-gc so "stats" can collect garbage first).
//
// Options come as one JSON argument (see ServerConfig). It prints one JSON
// line {"port"} once listening, then answers commands read line by line from
// standard input, each with one JSON line:
//   stats     memory after forcing GC, open connections, and how each named
//             connection ended on the server side (the request path names it)
//   peak      memory without GC (sampled while under load)
//   shutdown  server.shutdown({ closeWebSockets: true, timeout }) and exit
//
// The echo loop is written as an application would (examples/echo): read,
// write back, and conn.close() in a finally block.

import { CloseError, type Conn, ProtocolError } from "../../conn.ts";
import { serve, Upgrader } from "../../upgrader.ts";

interface ServerConfig {
  /** Read limit of every connection (0: none). */
  readLimit?: number;
  /** Each echo write must finish within this many ms. */
  writeTimeout?: number;
  /** serve()'s headTimeout. */
  headTimeout?: number;
  /** Offer permessage-deflate. */
  compression?: boolean;
  /** Milliseconds shutdown() gives closing handshakes. */
  shutdownTimeout?: number;
}

const config: ServerConfig = JSON.parse(Deno.args[0] ?? "{}");

const upgrader = new Upgrader({ enableCompression: config.compression });
const outcomes: Record<string, string> = {};
let open = 0;
let upgraded = 0;
let echoed = 0;

/** How a connection ended, in a form the test can compare. */
function describe(error: unknown): string {
  if (error instanceof CloseError) return `close ${error.code}`;
  if (error instanceof ProtocolError) return `protocol ${error.code}`;
  if (error instanceof Error) return error.name;
  return String(error);
}

async function echo(conn: Conn, name: string): Promise<void> {
  open++;
  try {
    if (config.readLimit) conn.setReadLimit(config.readLimit);
    while (true) {
      const { type, data } = await conn.readMessage();
      if (config.writeTimeout) {
        conn.setWriteDeadline(new Date(Date.now() + config.writeTimeout));
      }
      await conn.writeMessage(type, data);
      echoed++;
    }
  } catch (error) {
    outcomes[name] = describe(error);
  } finally {
    conn.close();
    open--;
  }
}

const server = serve({
  hostname: "127.0.0.1",
  port: 0,
  headTimeout: config.headTimeout,
  onListen(addr) {
    console.log(JSON.stringify({ port: addr.port }));
  },
  onError(error) {
    console.error("handler error:", error);
    return new Response("Internal Server Error\n", { status: 500 });
  },
}, async (request) => {
  const name = decodeURIComponent(new URL(request.url).pathname.slice(1));
  let conn: Conn;
  try {
    conn = await upgrader.upgrade(request);
  } catch (error) {
    outcomes[name] = `handshake ${
      (error as { status?: number }).status ?? describe(error)
    }`;
    return;
  }
  upgraded++;
  // Not awaited, as in examples/echo: a handler still running would keep its
  // Request alive for as long as the connection lasts. echo() never rejects.
  echo(conn, name);
});

function memory() {
  const { rss, heapUsed, external } = Deno.memoryUsage();
  return { rss, heapUsed, external };
}

const gc = (globalThis as { gc?: () => void }).gc;
const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
let pending = "";
for await (const chunk of lines) {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf("\n")) >= 0) {
    const command = pending.slice(0, newline).trim();
    pending = pending.slice(newline + 1);
    if (command === "stats") {
      // Several rounds, with macrotasks between, so finalizers run too.
      for (let i = 0; i < 4; i++) {
        gc?.();
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      console.log(JSON.stringify({
        ...memory(),
        gc: gc !== undefined,
        open,
        upgraded,
        echoed,
        outcomes,
      }));
    } else if (command === "peak") {
      console.log(JSON.stringify(memory()));
    } else if (command === "shutdown") {
      const started = performance.now();
      await server.shutdown({
        closeWebSockets: true,
        timeout: config.shutdownTimeout ?? 1000,
      });
      console.log(JSON.stringify({
        shutdownMs: Math.round(performance.now() - started),
        open,
        outcomes,
      }));
      Deno.exit(0);
    }
  }
}
