// The hot-path shortcuts keep every frame intact: a large
// payload read by readMessage() carries free room for its echo's header, so
// writing it back costs one transport write; every other use of such a
// payload (written twice, on another connection, as another type, a part of
// it) still sends exactly the right frames.

import assert from "node:assert/strict";
import { Conn, MESSAGE_TYPE, type Transport } from "../conn.ts";
import { createPipe, type Delivery, prng } from "../_pipe.ts";
import { FrameReader, frames } from "./_frames.ts";

function pattern(size: number, seed = size): Uint8Array {
  const random = prng(seed);
  return new Uint8Array(size).map(() => random() * 256);
}

/** Forwards to `inner` and records the size of every write. */
class RecordingTransport implements Transport {
  writes: number[] = [];
  #inner: Transport;

  constructor(inner: Transport) {
    this.#inner = inner;
  }

  read(buffer: Uint8Array): Promise<number | null> {
    return this.#inner.read(buffer);
  }

  write(data: Uint8Array): Promise<number> {
    this.writes.push(data.length);
    return this.#inner.write(data);
  }

  close(): void {
    this.#inner.close();
  }
}

/** A server Conn whose writes are recorded, and a raw client peer. */
function recordedServer(delivery: Delivery = "whole") {
  const [local, remote] = createPipe({ delivery });
  const transport = new RecordingTransport(local);
  const server = new Conn(transport, { role: "server" });
  const send = (type: number, payload: Uint8Array) =>
    remote.write(frames({ opcode: type, payload, mask: true }));
  return { server, transport, remote, send, reader: new FrameReader(remote) };
}

for (const size of [4096, 65535, 65536, 1 << 20]) {
  Deno.test(`writeMessage() sends a ${size}-byte payload from readMessage() in one write`, async () => {
    const { server, transport, remote, send, reader } = recordedServer();
    const payload = pattern(size);
    await send(MESSAGE_TYPE.Binary, payload);
    const message = await server.readMessage();
    assert.deepEqual(message.data, payload);
    await server.writeMessage(message.type, message.data);
    assert.deepEqual(transport.writes, [
      (size < 126 ? 2 : size < 65536 ? 4 : 10) + size,
    ]);
    const echoed = (await reader.next())!;
    assert.equal(echoed.opcode, MESSAGE_TYPE.Binary);
    assert.equal(echoed.fin, true);
    assert.deepEqual(echoed.payload, payload);
    server.close();
    remote.close();
  });
}

Deno.test("readMessage() reads a large payload split at every few bytes intact", async () => {
  const { server, remote, send, reader } = recordedServer({
    seed: 7,
    maxChunk: 3000,
  });
  const payload = pattern(200_000);
  await send(MESSAGE_TYPE.Binary, payload);
  const message = await server.readMessage();
  assert.deepEqual(message.data, payload);
  await server.writeMessage(message.type, message.data);
  assert.deepEqual((await reader.next())!.payload, payload);
  server.close();
  remote.close();
});

Deno.test("writeMessage() sends a read payload twice, as two types, both intact", async () => {
  const { server, transport, remote, send, reader } = recordedServer();
  const payload = new Uint8Array(70_000).fill(0x61);
  await send(MESSAGE_TYPE.Binary, payload);
  const { data } = await server.readMessage();
  // Both are queued before either is written: the second must not touch
  // the header room the first one uses.
  const first = server.writeMessage(MESSAGE_TYPE.Binary, data);
  const second = server.writeMessage(MESSAGE_TYPE.Text, data);
  await Promise.all([first, second]);
  const a = (await reader.next())!;
  const b = (await reader.next())!;
  assert.equal(a.opcode, MESSAGE_TYPE.Binary);
  assert.equal(b.opcode, MESSAGE_TYPE.Text);
  assert.deepEqual(a.payload, payload);
  assert.deepEqual(b.payload, payload);
  // The second frame's header was written on its own.
  assert.deepEqual(transport.writes, [10 + 70_000, 10, 70_000]);
  server.close();
  remote.close();
});

Deno.test("writeMessage() sends a read payload on another connection and a part of it, intact", async () => {
  const one = recordedServer();
  const two = recordedServer();
  const payload = pattern(100_000);
  await one.send(MESSAGE_TYPE.Binary, payload);
  const { data } = await one.server.readMessage();
  await two.server.writeMessage(MESSAGE_TYPE.Binary, data);
  await one.server.writeMessage(MESSAGE_TYPE.Binary, data.subarray(5000));
  assert.deepEqual((await two.reader.next())!.payload, payload);
  assert.deepEqual(
    (await one.reader.next())!.payload,
    payload.subarray(5000),
  );
  for (const { server, remote } of [one, two]) {
    server.close();
    remote.close();
  }
});

Deno.test("readMessage() leaves a large payload untouched by later reads and writes", async () => {
  const { server, remote, send, reader } = recordedServer();
  const payload = pattern(80_000);
  await send(MESSAGE_TYPE.Binary, payload);
  await send(MESSAGE_TYPE.Binary, pattern(80_000, 1));
  const first = await server.readMessage();
  await server.writeMessage(first.type, first.data);
  const second = await server.readMessage();
  await server.writeMessage(second.type, second.data);
  assert.deepEqual(first.data, payload);
  assert.deepEqual(second.data, pattern(80_000, 1));
  await reader.next();
  await reader.next();
  server.close();
  remote.close();
});

Deno.test("readMessage() validates a large text payload read in one buffer", async () => {
  const { server, remote, send } = recordedServer({ seed: 3, maxChunk: 900 });
  const text = "héllo ✓ 😀 ".repeat(1000);
  const bytes = new TextEncoder().encode(text);
  await send(MESSAGE_TYPE.Text, bytes);
  const message = await server.readMessage();
  assert.equal(new TextDecoder().decode(message.data), text);
  const bad = bytes.slice();
  bad[bytes.length - 1] = 0xff;
  await send(MESSAGE_TYPE.Text, bad);
  await assert.rejects(server.readMessage(), { name: "ProtocolError" });
  server.close();
  remote.close();
});
