// WebSocketStream over Conn, both sides: our client against our server,
// Deno's built-in server, the ws package (npm:ws) either way round, and
// Deno's own WebSocketStream (--unstable-net, in a subprocess) against our
// server; closing from either end, aborting, failures, and pull-based
// backpressure reaching the peer through TCP.

import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import type { AddressInfo } from "node:net";
import { NodeWebSocket, WebSocketServer } from "./_ws.ts";
import { BadHandshakeError, Dialer } from "../dialer.ts";
import { MESSAGE_TYPE } from "../frame.ts";
import { serve, Upgrader } from "../upgrader.ts";
import {
  upgradeWebSocketStream,
  type UpgradeWebSocketStreamOptions,
  WebSocketError,
  WebSocketStream,
} from "../stream.ts";

const noop = () => {};
const HOST = "127.0.0.1";

/** A serve() server handing each upgraded stream to `onStream`. */
function streamServer(
  onStream: (stream: WebSocketStream) => void | Promise<void>,
  options?: UpgradeWebSocketStreamOptions,
): { url: string; close(): Promise<void> } {
  const handled: Promise<void>[] = [];
  const server = serve(
    { hostname: HOST, port: 0, onListen() {} },
    (request) => {
      const { stream, response } = upgradeWebSocketStream(request, options);
      const result = Promise.resolve().then(() => onStream(stream));
      result.catch(noop); // rethrown by close()
      handled.push(result);
      return response;
    },
  );
  return {
    url: `ws://${HOST}:${server.addr.port}/`,
    async close() {
      await Promise.all(handled);
      await server.shutdown();
    },
  };
}

/** Echoes every message until the peer closes. */
async function echo(stream: WebSocketStream): Promise<void> {
  const { readable, writable } = await stream.opened;
  await readable.pipeTo(writable);
}

/** Reads the readable to its end, returning what it held. */
async function drain(
  readable: ReadableStream<string | Uint8Array>,
): Promise<(string | Uint8Array)[]> {
  const messages = [];
  for await (const message of readable) messages.push(message);
  return messages;
}

Deno.test("stream client and server exchange text and binary messages", async () => {
  const serverInfo = Promise.withResolvers<[string, string]>();
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    const { protocol, extensions } = await stream.opened;
    serverInfo.resolve([protocol, extensions]);
    await echo(stream);
    serverClosed.resolve(await stream.closed);
  }, { subprotocols: ["chat"], enableCompression: true });

  const client = new WebSocketStream(server.url, {
    protocols: ["other", "chat"],
    enableCompression: true,
  });
  assert.equal(client.url, server.url);
  const { readable, writable, protocol, extensions } = await client.opened;
  assert.equal(protocol, "chat");
  assert.match(extensions, /^permessage-deflate/);
  const [serverProtocol, serverExtensions] = await serverInfo.promise;
  assert.equal(serverProtocol, "chat");
  assert.match(serverExtensions, /^permessage-deflate/);

  const writer = writable.getWriter();
  const reader = readable.getReader();
  const big = new Uint8Array(1 << 20).map((_, i) => i % 251);
  const sent: [string | BufferSource, string | number[] | Uint8Array][] = [
    ["héllo \u{1f600}", "héllo \u{1f600}"],
    ["", ""],
    [new Uint8Array([1, 2, 3]), [1, 2, 3]],
    [new Uint8Array([0, 1, 2, 3, 4]).subarray(1, 3), [1, 2]],
    [new Uint8Array([5, 6]).buffer, [5, 6]],
    [new DataView(new Uint8Array([7, 8, 9]).buffer, 1), [8, 9]],
    [new Uint16Array([0x0102]), [
      ...new Uint8Array(new Uint16Array([0x0102]).buffer),
    ]],
    [big, big],
  ];
  for (const [chunk, expected] of sent) {
    await writer.write(chunk);
    const { value } = await reader.read();
    if (typeof expected === "string") assert.equal(value, expected);
    else {
      assert.ok(value instanceof Uint8Array);
      // The whole buffer is the message: nothing of other messages shows.
      assert.equal(value.byteLength, value.buffer.byteLength);
      assert.deepEqual([...value], [...expected]);
    }
  }
  await assert.rejects(writer.write(42 as unknown as string), TypeError);
  client.close();
  assert.deepEqual(await client.closed, { closeCode: 1000, reason: "" });
  assert.deepEqual(await serverClosed.promise, { closeCode: 1000, reason: "" });
  assert.deepEqual(await reader.read(), { value: undefined, done: true });
  await server.close();
});

Deno.test("closing the writable sends 1000 and settles closed on both sides", async () => {
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    await echo(stream);
    serverClosed.resolve(await stream.closed);
  });
  const client = new WebSocketStream(server.url);
  const { readable, writable } = await client.opened;
  const reading = drain(readable);
  const writer = writable.getWriter();
  await writer.write("last");
  await writer.close();
  assert.deepEqual(await client.closed, { closeCode: 1000, reason: "" });
  assert.deepEqual(await serverClosed.promise, { closeCode: 1000, reason: "" });
  assert.deepEqual(await reading, ["last"]);
  await server.close();
});

Deno.test("close() from the client carries its code and reason to the server", async () => {
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    const { readable } = await stream.opened;
    await drain(readable);
    serverClosed.resolve(await stream.closed);
  });
  const client = new WebSocketStream(server.url);
  await client.opened;
  client.close({ closeCode: 4000, reason: "client done" });
  client.close({ closeCode: 4999 }); // a second close does nothing
  assert.deepEqual(await serverClosed.promise, {
    closeCode: 4000,
    reason: "client done",
  });
  // The server's close handler echoes the code (RFC 6455 section 5.5.1).
  assert.deepEqual(await client.closed, { closeCode: 4000, reason: "" });
  await server.close();
});

Deno.test("close() from the server ends the client's readable and settles closed", async () => {
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    const { writable } = await stream.opened;
    const writer = writable.getWriter();
    await writer.write("bye soon");
    stream.close({ closeCode: 4001, reason: "server done" });
    serverClosed.resolve(await stream.closed);
  });
  const client = new WebSocketStream(server.url);
  const { readable, writable } = await client.opened;
  assert.deepEqual(await drain(readable), ["bye soon"]);
  assert.deepEqual(await client.closed, {
    closeCode: 4001,
    reason: "server done",
  });
  assert.deepEqual(await serverClosed.promise, { closeCode: 4001, reason: "" });
  await assert.rejects(writable.getWriter().write("late"));
  await server.close();
});

Deno.test("cancelling the readable or aborting the writable closes with the WebSocketError's code", async () => {
  const seen: unknown[] = [];
  const server = streamServer(async (stream) => {
    const { readable } = await stream.opened;
    await drain(readable);
    seen.push(await stream.closed);
  });
  const cancelled = new WebSocketStream(server.url);
  await (await cancelled.opened).readable.cancel(
    new WebSocketError("done", { closeCode: 4002, reason: "cancelled" }),
  );
  assert.deepEqual(await cancelled.closed, { closeCode: 4002, reason: "" });

  const aborted = new WebSocketStream(server.url);
  await (await aborted.opened).writable.abort(
    new WebSocketError("done", { closeCode: 4003, reason: "aborted" }),
  );
  assert.deepEqual(await aborted.closed, { closeCode: 4003, reason: "" });

  const plain = new WebSocketStream(server.url);
  await (await plain.opened).readable.cancel(new Error("not a WebSocketError"));
  assert.deepEqual(await plain.closed, { closeCode: 1000, reason: "" });
  await server.close();
  assert.deepEqual(seen, [
    { closeCode: 4002, reason: "cancelled" },
    { closeCode: 4003, reason: "aborted" },
    { closeCode: 1000, reason: "" },
  ]);
});

Deno.test("stream client against Deno.serve and Deno.upgradeWebSocket", async () => {
  const serverClose = Promise.withResolvers<[number, string]>();
  const server = Deno.serve(
    { hostname: HOST, port: 0, onListen() {} },
    (request) => {
      const { socket, response } = Deno.upgradeWebSocket(request);
      socket.binaryType = "arraybuffer";
      socket.onmessage = (event) => socket.send(event.data);
      socket.onclose = (event) =>
        serverClose.resolve([event.code, event.reason]);
      return response;
    },
  );
  // http: becomes ws:, as the WHATWG WebSocket constructor does.
  const client = new WebSocketStream(`http://${HOST}:${server.addr.port}/path`);
  assert.equal(client.url, `ws://${HOST}:${server.addr.port}/path`);
  const { readable, writable } = await client.opened;
  const writer = writable.getWriter();
  const reader = readable.getReader();
  await writer.write("text");
  assert.deepEqual(await reader.read(), { value: "text", done: false });
  await writer.write(new Uint8Array([9, 8, 7]));
  const { value } = await reader.read();
  assert.deepEqual([...(value as Uint8Array)], [9, 8, 7]);
  reader.releaseLock();
  client.close({ closeCode: 4004, reason: "to deno" });
  assert.deepEqual(await serverClose.promise, [4004, "to deno"]);
  assert.equal((await client.closed).closeCode, 4004);
  await server.shutdown();
});

Deno.test("stream client against a ws (npm) server that closes", async () => {
  const wss = new WebSocketServer({ host: HOST, port: 0 });
  await new Promise((resolve) => wss.once("listening", resolve));
  wss.on("connection", (ws: NodeWebSocket) => {
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      if (!isBinary && data.toString() === "close") {
        ws.close(4005, "ws says bye");
      } else ws.send(data, { binary: isBinary });
    });
  });
  const { port } = wss.address() as AddressInfo;
  const client = new WebSocketStream(`ws://${HOST}:${port}/`);
  const { readable, writable } = await client.opened;
  const writer = writable.getWriter();
  const reading = drain(readable);
  await writer.write("echo me");
  await writer.write(new Uint8Array([1, 2]));
  await writer.write("close");
  assert.deepEqual(await client.closed, {
    closeCode: 4005,
    reason: "ws says bye",
  });
  const messages = await reading;
  assert.equal(messages[0], "echo me");
  assert.deepEqual([...(messages[1] as Uint8Array)], [1, 2]);
  assert.equal(messages.length, 2);
  await new Promise((resolve) => wss.close(resolve));
});

Deno.test("ws (npm) client against a stream server", async () => {
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    await echo(stream);
    serverClosed.resolve(await stream.closed);
  });
  const ws = new NodeWebSocket(server.url);
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  const received: [string, boolean][] = [];
  const two = Promise.withResolvers<void>();
  ws.on("message", (data: Buffer, isBinary: boolean) => {
    received.push([isBinary ? [...data].join(",") : data.toString(), isBinary]);
    if (received.length === 2) two.resolve();
  });
  const closed = new Promise<[number, string]>((resolve) =>
    ws.once(
      "close",
      (code: number, reason: Buffer) => resolve([code, reason.toString()]),
    )
  );
  ws.send("from ws");
  ws.send(new Uint8Array([3, 4]));
  await two.promise;
  assert.deepEqual(received, [["from ws", false], ["3,4", true]]);
  ws.close(4006, "ws client done");
  assert.deepEqual(await serverClosed.promise, {
    closeCode: 4006,
    reason: "ws client done",
  });
  assert.equal((await closed)[0], 4006);
  await server.close();
});

Deno.test("an aborted signal stops the handshake: opened and closed reject with its reason", async () => {
  let requests = 0;
  const server = streamServer(() => {
    requests++;
  });
  const controller = new AbortController();
  controller.abort();
  const before = new WebSocketStream(server.url, { signal: controller.signal });
  await assert.rejects(before.opened, { name: "AbortError" });
  await assert.rejects(before.closed, { name: "AbortError" });
  await server.close();
  assert.equal(requests, 0);

  // Aborted while the server has not answered yet.
  using listener = Deno.listen({ hostname: HOST, port: 0 });
  const during = new AbortController();
  const stream = new WebSocketStream(`ws://${HOST}:${listener.addr.port}/`, {
    signal: during.signal,
  });
  const socket = await listener.accept();
  during.abort(new Error("gave up"));
  await assert.rejects(stream.opened, { message: "gave up" });
  await assert.rejects(stream.closed, { message: "gave up" });
  // The dialer closed its socket: the server side reads EOF.
  const buffer = new Uint8Array(4096);
  while (await socket.read(buffer) !== null);
  socket.close();
});

Deno.test("close() before the stream opened abandons the handshake", async () => {
  using listener = Deno.listen({ hostname: HOST, port: 0 });
  const stream = new WebSocketStream(`ws://${HOST}:${listener.addr.port}/`);
  const socket = await listener.accept();
  stream.close();
  const error = await stream.opened.catch((e) => e);
  assert.ok(error instanceof WebSocketError);
  assert.equal(error.closeCode, 1006);
  assert.equal(await stream.closed.catch((e) => e), error);
  const buffer = new Uint8Array(4096);
  while (await socket.read(buffer) !== null);
  socket.close();
});

Deno.test("a refused handshake rejects opened and closed with a WebSocketError", async () => {
  const server = Deno.serve(
    { hostname: HOST, port: 0, onListen() {} },
    () => new Response("no", { status: 403 }),
  );
  const stream = new WebSocketStream(`ws://${HOST}:${server.addr.port}/`);
  const error = await stream.opened.catch((e) => e);
  assert.ok(error instanceof WebSocketError);
  assert.equal(error.closeCode, 1006);
  assert.ok(error.cause instanceof BadHandshakeError);
  assert.equal(error.cause.status, 403);
  assert.equal(await stream.closed.catch((e) => e), error);
  await server.shutdown();
});

Deno.test("a failed stream whose promises nobody looks at does not crash the process", async () => {
  using listener = Deno.listen({ hostname: HOST, port: 0 });
  // Deno's own WebSocketStream ends the process with an unhandled rejection
  // here; this one's opened and closed are observed internally.
  new WebSocketStream(`ws://${HOST}:${listener.addr.port}/`);
  const socket = await listener.accept();
  await socket.write(
    new TextEncoder().encode(
      "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
    ),
  );
  // The dialer closes its socket as it fails the handshake.
  const buffer = new Uint8Array(4096);
  while (await socket.read(buffer) !== null);
  socket.close();
  // A turn of the event loop: an unhandled rejection would be reported now.
  await new Promise((resolve) => setTimeout(resolve, 0));
});

Deno.test("upgradeWebSocketStream on a request that did not come from serve()", async () => {
  const request = new Request("http://localhost/", {
    headers: {
      upgrade: "websocket",
      connection: "upgrade",
      "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
      "sec-websocket-version": "13",
    },
  });
  const { stream, response } = upgradeWebSocketStream(request);
  assert.equal(stream.url, "ws://localhost/");
  // Sent by a server that did not hand its connection over: nothing upgraded.
  assert.equal(response.status, 500);
  await response.body?.cancel();
  const error = await stream.opened.catch((e) => e);
  assert.ok(error instanceof WebSocketError);
  assert.ok(error.cause instanceof TypeError);
  await assert.rejects(stream.closed, WebSocketError);
});

Deno.test("a peer that vanishes without a close frame rejects closed with 1006", async () => {
  const upgrader = new Upgrader();
  const server = serve(
    { hostname: HOST, port: 0, onListen() {} },
    async (request) => {
      const conn = await upgrader.upgrade(request);
      await conn.writeMessage(MESSAGE_TYPE.Text, "going");
      conn.close(); // the transport, without the closing handshake
    },
  );
  const client = new WebSocketStream(`ws://${HOST}:${server.addr.port}/`);
  const { readable } = await client.opened;
  const reader = readable.getReader();
  assert.deepEqual(await reader.read(), { value: "going", done: false });
  const readError = await reader.read().catch((e) => e);
  assert.ok(readError instanceof WebSocketError);
  const closedError = await client.closed.catch((e) => e);
  assert.ok(closedError instanceof WebSocketError);
  assert.equal(closedError.closeCode, 1006);
  await server.shutdown();
});

Deno.test("the dialer's readLimit applies: a larger message fails with 1009", async () => {
  const server = streamServer(async (stream) => {
    const { writable, readable } = await stream.opened;
    await writable.getWriter().write("x".repeat(100));
    await drain(readable).catch(noop);
    await stream.closed.catch(noop);
  });
  const client = new WebSocketStream(server.url, { readLimit: 10 });
  const { readable } = await client.opened;
  const error = await readable.getReader().read().catch((e) => e);
  assert.ok(error instanceof WebSocketError);
  assert.equal(error.closeCode, 1009);
  await assert.rejects(client.closed, WebSocketError);
  await server.close();
});

Deno.test("close codes and reasons are checked as WHATWG WebSockets close() does", async () => {
  for (const closeCode of [999, 1001, 1005, 1006, 2999, 5000]) {
    assert.throws(() => new WebSocketError("", { closeCode }), {
      name: "InvalidAccessError",
    });
  }
  assert.throws(() => new WebSocketError("", { reason: "é".repeat(62) }), {
    name: "SyntaxError",
  });
  assert.equal(new WebSocketError("", { reason: "x" }).closeCode, 1000);
  assert.equal(new WebSocketError("").closeCode, null);
  for (const url of ["ftp://host/", "ws://host/#fragment", "not a url"]) {
    assert.throws(() => new WebSocketStream(url), { name: "SyntaxError" });
  }

  const server = streamServer(async (stream) => {
    await drain((await stream.opened).readable);
    await stream.closed;
  });
  const client = new WebSocketStream(server.url);
  await client.opened;
  assert.throws(() => client.close({ closeCode: 1001 }), {
    name: "InvalidAccessError",
  });
  assert.throws(() => client.close({ reason: "x".repeat(124) }), {
    name: "SyntaxError",
  });
  client.close({ closeCode: 3000, reason: "x".repeat(123) });
  assert.equal((await client.closed).closeCode, 3000);
  await server.close();
});

Deno.test("fromConn wraps connections from an Upgrader and a Dialer", async () => {
  const upgrader = new Upgrader();
  const serverClosed = Promise.withResolvers<unknown>();
  const server = serve(
    { hostname: HOST, port: 0, onListen() {} },
    async (request) => {
      const stream = WebSocketStream.fromConn(await upgrader.upgrade(request), {
        url: request.url,
      });
      assert.equal(stream.url, request.url);
      await echo(stream);
      serverClosed.resolve(await stream.closed);
    },
  );
  const { conn } = await new Dialer({ enableCompression: true }).dial(
    `ws://${HOST}:${server.addr.port}/`,
  );
  const client = WebSocketStream.fromConn(conn);
  assert.equal(client.url, "");
  const { readable, writable, extensions } = await client.opened;
  // Compression was not enabled on the Upgrader.
  assert.equal(extensions, "");
  const writer = writable.getWriter();
  const reader = readable.getReader();
  await writer.write("via fromConn");
  assert.deepEqual(await reader.read(), { value: "via fromConn", done: false });
  client.close({ closeCode: 4007 });
  assert.deepEqual(await client.closed, { closeCode: 4007, reason: "" });
  assert.deepEqual(await serverClosed.promise, { closeCode: 4007, reason: "" });
  await server.shutdown();
});

Deno.test("a consumer that does not read stops the socket being read, holding the peer's writes back", async () => {
  const MESSAGE = 1 << 20;
  const MESSAGES = 64;
  const release = Promise.withResolvers<void>();
  const serverRead = Promise.withResolvers<number>();
  const server = streamServer(async (stream) => {
    const { readable } = await stream.opened;
    await release.promise; // nothing pulls the readable until then
    let bytes = 0;
    for await (const message of readable) bytes += message.length;
    serverRead.resolve(bytes);
    await stream.closed;
  });
  const { conn } = await new Dialer().dial(server.url);
  const payload = new Uint8Array(MESSAGE);
  let written = 0;
  const writing = (async () => {
    for (let i = 0; i < MESSAGES; i++) {
      await conn.writeMessage(MESSAGE_TYPE.Binary, payload);
      written++;
    }
  })();
  // Wait until the writes stop moving (or all of them went through, which
  // the assertion below reports as a failure).
  let last = -1;
  let still = 0;
  while (written < MESSAGES && still < 5) {
    await new Promise((resolve) => setTimeout(resolve, 40));
    still = written === last ? still + 1 : 0;
    last = written;
  }
  // Only socket buffers (a few MiB on loopback) hold what was written.
  assert.ok(
    written * MESSAGE <= 16 * MESSAGE,
    `${written} MiB were accepted while the server read nothing`,
  );
  release.resolve();
  await writing;
  assert.equal(written, MESSAGES);
  await conn.closeGracefully(1000, "", { timeout: 5000 });
  assert.equal(await serverRead.promise, MESSAGES * MESSAGE);
  await server.close();
});

Deno.test("Deno's own WebSocketStream (--unstable-net) against a stream server", async () => {
  const serverClosed = Promise.withResolvers<unknown>();
  const server = streamServer(async (stream) => {
    await echo(stream);
    serverClosed.resolve(await stream.closed);
  }, { protocol: "deno" });
  const script = `
    const stream = new WebSocketStream(Deno.args[0], { protocols: ["deno"] });
    const { readable, writable, protocol } = await stream.opened;
    const writer = writable.getWriter();
    const reader = readable.getReader();
    await writer.write("native");
    const text = (await reader.read()).value;
    await writer.write(new Uint8Array([4, 5, 6]));
    const bytes = [...(await reader.read()).value];
    stream.close({ closeCode: 4008, reason: "native done" });
    const closed = await stream.closed;
    console.log(JSON.stringify({ protocol, text, bytes, closed }));
  `;
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--unstable-net", script, server.url],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(code, 0, new TextDecoder().decode(stderr));
  assert.deepEqual(JSON.parse(new TextDecoder().decode(stdout)), {
    protocol: "deno",
    text: "native",
    bytes: [4, 5, 6],
    closed: { closeCode: 4008, reason: "" },
  });
  assert.deepEqual(await serverClosed.promise, {
    closeCode: 4008,
    reason: "native done",
  });
  await server.close();
});
