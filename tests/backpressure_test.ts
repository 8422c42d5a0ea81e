// Backpressure: a peer that stops reading makes our writes wait,
// bounded by the write deadline; nothing queues without limit; a slow
// consumer cannot grow an echo server's memory, and gets every byte.

import assert from "node:assert/strict";
import { Conn, MESSAGE_TYPE } from "../conn.ts";
import { createPipe } from "../_pipe.ts";
import { frame, FrameReader, OP } from "./_frames.ts";
import { tcpConnPair } from "./_helpers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

Deno.test("writeMessage() waits while the peer does not read, and the write deadline ends the wait with TimedOut", async () => {
  const capacity = 64 * KiB;
  const [local, remote] = createPipe({ capacity });
  const conn = new Conn(local, { role: "server" });
  conn.setWriteDeadline(new Date(Date.now() + 100));
  const size = 16 * KiB;
  let written = 0;
  let failure: unknown;
  for (let i = 0; i < 1000 && failure === undefined; i++) {
    try {
      await conn.writeMessage(
        MESSAGE_TYPE.Binary,
        new Uint8Array(size).fill(i),
      );
      written++;
    } catch (error) {
      failure = error;
    }
  }
  assert.ok(failure instanceof Deno.errors.TimedOut, String(failure));
  // Only what the pipe holds, plus the Conn's short queue, was accepted.
  assert.ok(
    written * size <= capacity + 128 * KiB,
    `${written} writes of ${size} bytes resolved`,
  );
  assert.ok(
    remote.buffered <= capacity + size,
    `pipe holds ${remote.buffered}`,
  );
  // What did reach the peer is whole frames, in order, up to the cut.
  conn.close();
  const frames = await new FrameReader(remote).all();
  frames.forEach((f, i) => {
    assert.equal(f.opcode, OP.binary);
    assert.equal(f.payload[0], i & 0xff);
  });
  assert.ok(frames.length >= written - 1);
  remote.close();
});

Deno.test("un-awaited writes to a peer that stops reading wait instead of queueing their bytes", async () => {
  const capacity = 64 * KiB;
  const [local, remote] = createPipe({ capacity });
  const conn = new Conn(local, { role: "client" });
  const payload = new Uint8Array(2000).fill(9);
  const count = 20_000; // 40 MB if every message were copied into a queue
  const before = Deno.memoryUsage();
  let settled = 0;
  const writes = Array.from(
    { length: count },
    () =>
      conn.writeMessage(MESSAGE_TYPE.Binary, payload).then(
        () => settled++,
        () => settled++,
      ),
  );
  await new Promise((resolve) => setTimeout(resolve, 50));
  const during = Deno.memoryUsage();
  assert.ok(settled < count, "writes wait for the peer");
  assert.ok(remote.buffered <= capacity, `pipe holds ${remote.buffered}`);
  // Copies of 2000-byte payloads would be external (ArrayBuffer) memory.
  const grown = during.external - before.external;
  assert.ok(grown < 8 * MiB, `external memory grew by ${grown} bytes`);
  // The peer reads again: every message arrives, whole and in order.
  const reader = new FrameReader(remote);
  for (let i = 0; i < count; i++) {
    const f = await reader.next();
    assert.equal(f?.payload.length, 2000, `message ${i}`);
  }
  await Promise.all(writes);
  assert.equal(settled, count);
  conn.close();
  remote.close();
});

Deno.test("a client that floods an echo server and never reads stalls it instead of growing its memory", async () => {
  const capacity = 256 * KiB;
  const [serverEnd, clientEnd] = createPipe({ capacity });
  const server = new Conn(serverEnd, { role: "server" });
  let echoed = 0;
  const echo = (async () => {
    try {
      while (true) {
        const { type, data } = await server.readMessage();
        server.setWriteDeadline(new Date(Date.now() + 300));
        await server.writeMessage(type, data);
        echoed++;
      }
    } catch (error) {
      return error;
    } finally {
      server.close();
    }
  })();
  const message = frame({
    opcode: OP.binary,
    payload: new Uint8Array(64 * KiB),
    mask: true,
  });
  let sent = 0;
  const flooding = (async () => {
    try {
      for (let i = 0; i < 1000; i++) {
        for (let o = 0; o < message.length;) {
          o += await clientEnd.write(message.subarray(o));
        }
        sent++;
      }
    } catch {
      // The server gave up on us and closed: the flood ends.
    }
  })();
  const error = await echo;
  await flooding;
  // The server stopped reading once its echo could not be written, so the
  // flood was held back by the pipes, not buffered by the server.
  assert.ok(error instanceof Deno.errors.TimedOut, String(error));
  assert.ok(sent < 20, `the client pushed ${sent} messages of 64 KiB`);
  assert.ok(echoed * 64 * KiB <= capacity + 64 * KiB, `${echoed} echoed`);
  clientEnd.close();
});

Deno.test("a slow consumer over TCP gets every byte in order while the writer waits for it", async () => {
  const { server, client } = await tcpConnPair();
  const count = 200;
  const size = 32 * KiB;
  let resolved = 0;
  const writing = (async () => {
    for (let i = 0; i < count; i++) {
      await server.writeMessage(
        MESSAGE_TYPE.Binary,
        new Uint8Array(size).fill(i),
      );
      resolved++;
    }
  })();
  // Let the writer run into the full socket before reading anything.
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.ok(resolved < count, "the writer waits for the reader");
  for (let i = 0; i < count; i++) {
    const { data } = await client.readMessage();
    assert.equal(data.length, size);
    assert.ok(data.every((b) => b === (i & 0xff)), `message ${i}`);
    if (i % 20 === 0) await new Promise((resolve) => setTimeout(resolve, 2));
  }
  await writing;
  await Promise.all([
    client.closeGracefully(1000, "", { timeout: 1000 }),
    server.closeGracefully(1000, "", { timeout: 1000 }),
  ]);
});
