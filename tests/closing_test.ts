// Closing in every order, over real loopback sockets so that
// Deno's resource sanitizer proves each case leaves nothing open: both sides
// closing at once, a close in the middle of a fragmented message, a close
// while a streaming writer is open, the peer vanishing without a close, and
// the handshake, read and write deadlines each firing.

import assert from "node:assert/strict";
import {
  CloseError,
  CloseSentError,
  Conn,
  ConnectionClosedError,
  isCloseError,
  MESSAGE_TYPE,
} from "../conn.ts";
import { Dialer } from "../dialer.ts";
import { Upgrader } from "../upgrader.ts";
import { createPipe } from "../_pipe.ts";
import { closePayload, frame, FrameReader, OP, parseClose } from "./_frames.ts";
import { tcpConnPair, tcpSockets, writeAll } from "./_helpers.ts";

/** A server Conn whose peer is a raw socket the test drives by hand. */
async function rawClientPair(): Promise<{
  server: Conn;
  raw: Deno.TcpConn;
  frames: FrameReader;
}> {
  const [serverSocket, raw] = await tcpSockets();
  return {
    server: new Conn(serverSocket, { role: "server" }),
    raw,
    frames: new FrameReader(raw),
  };
}

const masked = (spec: Parameters<typeof frame>[0]) =>
  frame({ ...spec, mask: true });

Deno.test("closeGracefully() on both sides at once resolves on both, and both reads end with the other's 1000", async () => {
  const { server, client } = await tcpConnPair();
  const reads = [server.readMessage(), client.readMessage()].map((read) =>
    read.then(() => assert.fail("no message was sent"), (error) => error)
  );
  await Promise.all([
    server.closeGracefully(1000, "server done", { timeout: 2000 }),
    client.closeGracefully(1000, "client done", { timeout: 2000 }),
  ]);
  const [serverError, clientError] = await Promise.all(reads);
  assert.ok(isCloseError(serverError, 1000), String(serverError));
  assert.equal(serverError.text, "client done");
  assert.ok(isCloseError(clientError, 1000), String(clientError));
  assert.equal(clientError.text, "server done");
  assert.ok(server.closed && client.closed);
});

Deno.test("close() on both sides at once rejects every pending read and write, and never unobserved", async () => {
  const { server, client } = await tcpConnPair();
  const pending = [
    server.readMessage(),
    client.readMessage(),
    server.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(1 << 20)),
    client.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(1 << 20)),
  ];
  server.close();
  client.close();
  const results = await Promise.allSettled(pending);
  // Each read rejects; each write either went out before the close or
  // rejects with the local close.
  for (const [i, result] of results.entries()) {
    if (i < 2) assert.equal(result.status, "rejected");
    if (result.status === "rejected") {
      assert.ok(
        result.reason instanceof ConnectionClosedError ||
          result.reason instanceof CloseError,
        String(result.reason),
      );
    }
  }
});

Deno.test("a close in the middle of a fragmented message ends readMessage() with the peer's code and is echoed", async () => {
  const { server, raw, frames } = await rawClientPair();
  await writeAll(
    raw,
    masked({ opcode: OP.text, fin: false, payload: "first half" }),
  );
  await writeAll(
    raw,
    masked({ opcode: OP.close, payload: closePayload(1001, "gone") }),
  );
  await assert.rejects(server.readMessage(), (error) => {
    assert.ok(isCloseError(error, 1001), String(error));
    assert.equal((error as CloseError).text, "gone");
    return true;
  });
  const echo = await frames.next();
  assert.equal(echo?.opcode, OP.close);
  assert.equal(parseClose(echo!.payload).code, 1001);
  // Both close frames have crossed: the server closes the TCP connection.
  assert.equal(await frames.next(), null);
  assert.ok(server.closed);
  raw.close();
});

Deno.test("a close in the middle of a fragmented message fails a streaming reader after the bytes it got", async () => {
  const { server, raw, frames } = await rawClientPair();
  await writeAll(
    raw,
    masked({
      opcode: OP.binary,
      fin: false,
      payload: new Uint8Array([1, 2, 3]),
    }),
  );
  const { reader } = await server.nextReader();
  const buffer = new Uint8Array(16);
  assert.equal(await reader.read(buffer), 3);
  await writeAll(
    raw,
    masked({ opcode: OP.close, payload: closePayload(4000) }),
  );
  await assert.rejects(reader.read(buffer), (e) => isCloseError(e, 4000));
  // The next read keeps failing the same way.
  await assert.rejects(server.readMessage(), (e) => isCloseError(e, 4000));
  assert.equal(parseClose((await frames.next())!.payload).code, 4000);
  assert.equal(await frames.next(), null);
  raw.close();
});

Deno.test("a peer's close while our streaming writer is open is echoed between fragments, then the writer fails", async () => {
  const { server, raw, frames } = await rawClientPair();
  const writer = server.nextWriter(MESSAGE_TYPE.Binary);
  await writer.write(new Uint8Array(8192).fill(1));
  const reading = server.readMessage().catch((error) => error);
  await writeAll(
    raw,
    masked({ opcode: OP.close, payload: closePayload(1000) }),
  );
  assert.ok(isCloseError(await reading, 1000));
  // What went out: fragments of the open message (never finished), then
  // the echoed close, then EOF.
  const seen: number[] = [];
  for (let f; (f = await frames.next()) !== null;) {
    seen.push(f.opcode);
    if (f.opcode !== OP.close) assert.equal(f.fin, false);
  }
  assert.equal(seen.at(-1), OP.close);
  assert.ok(
    seen.slice(0, -1).every((op) => op === OP.binary || op === OP.cont),
  );
  // As in gorilla, bytes that fit the writer's buffer are only copied;
  // whatever must reach the wire fails, and so does finishing the message.
  await assert.rejects(
    writer.write(new Uint8Array(64 * 1024)),
    (e) => e instanceof CloseSentError || e instanceof ConnectionClosedError,
  );
  await assert.rejects(
    writer.close(),
    (e) => e instanceof CloseSentError || e instanceof ConnectionClosedError,
  );
  raw.close();
});

Deno.test("closeGracefully() while our streaming writer is open completes the handshake; the writer then fails", async () => {
  const { server, client } = await tcpConnPair();
  const writer = client.nextWriter(MESSAGE_TYPE.Text);
  await writer.write("partial ");
  const serverReading = server.readMessage().catch((error) => error);
  await client.closeGracefully(1000, "", { timeout: 2000 });
  // Closed by then: the transport is gone, so ConnectionClosedError is as
  // right as CloseSentError.
  const closedOrSent = (e: unknown) =>
    e instanceof CloseSentError || e instanceof ConnectionClosedError;
  await assert.rejects(writer.write("x".repeat(64 * 1024)), closedOrSent);
  await assert.rejects(writer.close(), closedOrSent);
  assert.ok(isCloseError(await serverReading, 1000));
  server.close();
});

Deno.test("the peer vanishing without a close fails a pending read with 1006 and closes the socket", async () => {
  const { server, raw } = await rawClientPair();
  const reading = server.readMessage();
  raw.close();
  await assert.rejects(reading, (e) => isCloseError(e, 1006));
  assert.ok(server.closed);
  // Reads stay failed.
  await assert.rejects(server.readMessage(), (e) => isCloseError(e, 1006));
});

Deno.test("the peer vanishing in the middle of a message fails the read with 1006", async () => {
  const { server, raw } = await rawClientPair();
  const whole = masked({ opcode: OP.binary, payload: new Uint8Array(5000) });
  await writeAll(raw, whole.subarray(0, 2500));
  const reading = server.readMessage();
  raw.close();
  await assert.rejects(reading, (e) => isCloseError(e, 1006));
  assert.ok(server.closed);
});

Deno.test("the peer vanishing while we write fails the writes, none unobserved", async () => {
  const { server, raw } = await rawClientPair();
  raw.close();
  const big = new Uint8Array(1 << 20);
  // Write until the dead socket is noticed; each write rejects or resolves,
  // and the first failure is sticky.
  let failure: unknown;
  for (let i = 0; i < 100 && failure === undefined; i++) {
    await server.writeMessage(MESSAGE_TYPE.Binary, big).catch((error) => {
      failure = error;
    });
  }
  assert.ok(isCloseError(failure, 1006), String(failure));
  await assert.rejects(
    server.writeMessage(MESSAGE_TYPE.Text, "x"),
    (e) => isCloseError(e, 1006) || e instanceof ConnectionClosedError,
  );
  // The read side learns it too, and the socket gets closed.
  await assert.rejects(
    server.readMessage(),
    (e) => e instanceof CloseError || e instanceof ConnectionClosedError,
  );
  server.close();
});

Deno.test("the Dialer's handshake timeout fires against a server that never answers and closes its socket", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepted = listener.accept();
  const dialing = new Dialer({ handshakeTimeout: 150 }).dial(
    `ws://127.0.0.1:${listener.addr.port}/`,
  );
  const socket = await accepted;
  await assert.rejects(dialing, Deno.errors.TimedOut);
  // The dialer closed its socket: the server side reads the request, then EOF.
  const buffer = new Uint8Array(4096);
  let eof = false;
  for (let i = 0; i < 20 && !eof; i++) {
    eof = (await socket.read(buffer)) === null;
  }
  assert.ok(eof, "the dialer closed its socket");
  socket.close();
});

Deno.test("the Upgrader's handshake timeout fires when the 101 cannot be written and closes the transport", async () => {
  // A pipe whose reader never reads and that holds 16 bytes: the 101 is stuck.
  const [local, remote] = createPipe({ capacity: 16 });
  const request = new Request("http://127.0.0.1/", {
    headers: {
      upgrade: "websocket",
      connection: "Upgrade",
      "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
      "sec-websocket-version": "13",
    },
  });
  const upgrading = new Upgrader({ handshakeTimeout: 100 })
    .upgradeConnection(local, request);
  await assert.rejects(upgrading, Deno.errors.TimedOut);
  assert.ok(local.closed, "the transport was closed");
  remote.close();
});

Deno.test("a read deadline firing fails the read with TimedOut; a graceful close still sends the close frame and closes", async () => {
  const { server, raw, frames } = await rawClientPair();
  server.setReadDeadline(new Date(Date.now() + 50));
  await assert.rejects(server.readMessage(), Deno.errors.TimedOut);
  await assert.rejects(server.readMessage(), Deno.errors.TimedOut, "sticky");
  await server.closeGracefully(1001, "idle", { timeout: 500 });
  const f = await frames.next();
  assert.equal(f?.opcode, OP.close);
  assert.deepEqual(parseClose(f!.payload), { code: 1001, reason: "idle" });
  assert.equal(await frames.next(), null);
  raw.close();
});

Deno.test("a write deadline firing against a peer that stops reading fails writes with TimedOut, and close() frees everything", async () => {
  const { server, raw } = await rawClientPair();
  server.setWriteDeadline(new Date(Date.now() + 200));
  const chunk = new Uint8Array(256 * 1024);
  let failure: unknown;
  // The kernel buffers take a few MiB; the deadline cuts in after that.
  for (let i = 0; i < 400 && failure === undefined; i++) {
    await server.writeMessage(MESSAGE_TYPE.Binary, chunk).catch((error) => {
      failure = error;
    });
  }
  assert.ok(failure instanceof Deno.errors.TimedOut, String(failure));
  // The write side stays failed, even with the deadline lifted.
  server.setWriteDeadline(null);
  await assert.rejects(
    server.writeMessage(MESSAGE_TYPE.Text, "late"),
    Deno.errors.TimedOut,
  );
  server.close();
  // The peer sees the connection end after whatever was written.
  const buffer = new Uint8Array(1 << 20);
  try {
    while ((await raw.read(buffer)) !== null);
  } catch {
    // A reset ends it too.
  }
  raw.close();
});
