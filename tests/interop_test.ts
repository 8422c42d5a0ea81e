// Interop: third-party clients against our server side. Deno's built-in
// WebSocket and the ws package (npm:ws) exchange text and binary messages
// from 0 B to 1 MiB with an echo server and close cleanly in both directions,
// whether the Upgrader sits behind serve(), serve() over TLS, or a node:http
// server's 'upgrade' event.

import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { NodeWebSocket } from "./_ws.ts";
import { CloseError, type Conn } from "../conn.ts";
import { serve, Upgrader } from "../upgrader.ts";
import { pattern, textOf } from "./_helpers.ts";

const SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20];
const fixture = (name: string) =>
  Deno.readTextFileSync(new URL(`./fixtures/${name}`, import.meta.url));
const CA = fixture("ca.pem");

/** An echo server for one client, however it receives its upgrade. */
interface EchoServer {
  url: string;
  /** The first connection the server upgrades. */
  conn: Promise<Conn>;
  /** How the first connection ended: the error its read loop saw. */
  ended: Promise<unknown>;
  close(): Promise<void>;
}

type Front = "serve()" | "serve() over TLS" | "node:http";

/**
 * Starts an echo server: every data message is written back unchanged until
 * reading fails, then the connection is closed.
 */
async function echoServer(front: Front): Promise<EchoServer> {
  const upgrader = new Upgrader();
  const upgraded = Promise.withResolvers<Conn>();
  const ended = Promise.withResolvers<unknown>();
  const echo = async (conn: Conn) => {
    upgraded.resolve(conn);
    try {
      for (;;) {
        const { type, data } = await conn.readMessage();
        await conn.writeMessage(type, data);
      }
    } catch (error) {
      ended.resolve(error);
    } finally {
      conn.close();
    }
  };
  if (front === "node:http") {
    const server = createServer((_request, response) => response.end());
    server.on("upgrade", async (request, socket, head) => {
      await echo(await upgrader.upgradeNode(request, socket, { head }));
    });
    await new Promise<void>((resolve) =>
      server.listen(0, "127.0.0.1", resolve)
    );
    const { port } = server.address() as AddressInfo;
    return {
      url: `ws://127.0.0.1:${port}/`,
      conn: upgraded.promise,
      ended: ended.promise,
      close: () => new Promise((resolve) => server.close(() => resolve())),
    };
  }
  const tls = front === "serve() over TLS"
    ? { cert: fixture("cert.pem"), key: fixture("key.pem") }
    : {};
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {}, ...tls },
    async (request) => {
      await echo(await upgrader.upgrade(request));
    },
  );
  const scheme = front === "serve() over TLS" ? "wss" : "ws";
  const host = front === "serve() over TLS" ? "localhost" : "127.0.0.1";
  return {
    url: `${scheme}://${host}:${server.addr.port}/`,
    conn: upgraded.promise,
    ended: ended.promise,
    close: () => server.shutdown({ closeWebSockets: true, timeout: 1000 }),
  };
}

/** Asserts the server's read loop ended on the client's close frame. */
function assertNormalClosure(error: unknown, text: string): void {
  assert.ok(error instanceof CloseError, `expected a CloseError, got ${error}`);
  assert.equal(error.code, 1000);
  assert.equal(error.text, text);
}

/** Opens an npm:ws client; over TLS it trusts the fixture CA. */
async function openNodeClient(url: string): Promise<NodeWebSocket> {
  const ws = new NodeWebSocket(url, { ca: CA });
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  return ws;
}

function nodeClosed(ws: NodeWebSocket): Promise<[number, string]> {
  return new Promise((resolve) =>
    ws.once(
      "close",
      (code: number, reason: Buffer) => resolve([code, reason.toString()]),
    )
  );
}

// Deno's WebSocket has no option to trust a CA, so it speaks to the plain
// fronts; npm:ws covers TLS.
for (const front of ["serve()", "node:http"] as const) {
  Deno.test(`Deno's WebSocket client exchanges text and binary messages of 0 B to 1 MiB with ${front} and closes cleanly`, async () => {
    const server = await echoServer(front);
    try {
      const ws = new WebSocket(server.url);
      ws.binaryType = "arraybuffer";
      const queue: unknown[] = [];
      let wake: (() => void) | undefined;
      ws.onmessage = (event) => {
        queue.push(event.data);
        wake?.();
      };
      const next = async () => {
        while (queue.length === 0) {
          await new Promise<void>((resolve) => wake = resolve);
        }
        return queue.shift();
      };
      await new Promise((resolve) => ws.onopen = resolve);
      for (const size of SIZES) {
        const text = textOf(size);
        ws.send(text);
        assert.equal(await next(), text, `text of ${size} B`);
        const binary = pattern(size);
        ws.send(binary);
        const echoed = await next();
        assert.ok(echoed instanceof ArrayBuffer);
        assert.deepEqual(new Uint8Array(echoed), binary, `binary of ${size} B`);
      }
      const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
      ws.close(1000, "done");
      const event = await closed;
      // The server echoes the code only, as gorilla's default close handler.
      assert.equal(event.code, 1000);
      assert.equal(event.reason, "");
      assert.equal(event.wasClean, true);
      assertNormalClosure(await server.ended, "done");
    } finally {
      await server.close();
    }
  });

  Deno.test(`Deno's WebSocket client sees a clean 1000 when ${front} closes first`, async () => {
    const server = await echoServer(front);
    try {
      const ws = new WebSocket(server.url);
      await new Promise((resolve) => ws.onopen = resolve);
      const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
      await (await server.conn).closeGracefully(1000, "server done", {
        timeout: 2000,
      });
      const event = await closed;
      assert.equal(event.code, 1000);
      assert.equal(event.reason, "server done");
      assert.equal(event.wasClean, true);
      await server.ended;
    } finally {
      await server.close();
    }
  });
}

for (const front of ["serve()", "serve() over TLS", "node:http"] as const) {
  Deno.test(`the ws package's client exchanges text and binary messages of 0 B to 1 MiB with ${front} and closes cleanly`, async () => {
    const server = await echoServer(front);
    try {
      const ws = await openNodeClient(server.url);
      const queue: { data: Buffer; isBinary: boolean }[] = [];
      let wake: (() => void) | undefined;
      ws.on("message", (data: Buffer, isBinary: boolean) => {
        queue.push({ data, isBinary });
        wake?.();
      });
      const next = async () => {
        while (queue.length === 0) {
          await new Promise<void>((resolve) => wake = resolve);
        }
        return queue.shift()!;
      };
      for (const size of SIZES) {
        const text = textOf(size);
        ws.send(text);
        const echoedText = await next();
        assert.equal(echoedText.isBinary, false);
        assert.equal(
          echoedText.data.toString("utf8"),
          text,
          `text of ${size} B`,
        );
        const binary = pattern(size);
        ws.send(binary);
        const echoedBinary = await next();
        assert.equal(echoedBinary.isBinary, true);
        assert.deepEqual(
          new Uint8Array(echoedBinary.data),
          binary,
          `binary of ${size} B`,
        );
      }
      const closed = nodeClosed(ws);
      ws.close(1000, "done");
      // The server echoes the code only, as gorilla's default close handler.
      assert.deepEqual(await closed, [1000, ""]);
      assertNormalClosure(await server.ended, "done");
    } finally {
      await server.close();
    }
  });

  Deno.test(`the ws package's client sees a clean 1000 when ${front} closes first`, async () => {
    const server = await echoServer(front);
    try {
      const ws = await openNodeClient(server.url);
      const closed = nodeClosed(ws);
      await (await server.conn).closeGracefully(1000, "server done", {
        timeout: 2000,
      });
      assert.deepEqual(await closed, [1000, "server done"]);
      await server.ended;
    } finally {
      await server.close();
    }
  });
}

Deno.test("both clients are told 1001 when serve() shuts down with closeWebSockets", async () => {
  const server = await echoServer("serve()");
  const browser = new WebSocket(server.url);
  const node = new NodeWebSocket(server.url);
  await Promise.all([
    new Promise((resolve) => browser.onopen = resolve),
    new Promise((resolve) => node.once("open", resolve)),
  ]);
  const browserClosed = new Promise<CloseEvent>((resolve) =>
    browser.onclose = resolve
  );
  const closedNode = nodeClosed(node);
  await server.close();
  assert.equal((await browserClosed).code, 1001);
  assert.equal((await closedNode)[0], 1001);
});
