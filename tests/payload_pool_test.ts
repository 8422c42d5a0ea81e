// Large payloads handed back by disposing a Message are reused for the next
// large read, never while a write still needs their bytes, and a message
// kept past its disposal is empty rather than showing another's bytes.

import assert from "node:assert/strict";
import { Conn, MESSAGE_TYPE } from "../conn.ts";
import { createPipe, type PipeOptions, prng } from "../_pipe.ts";
import {
  handBack,
  POOLED_PAYLOAD,
  takePayloadBuffer,
} from "../_payload_pool.ts";

const MiB = 1024 * 1024;

function pattern(size: number, seed: number): Uint8Array {
  const random = prng(seed);
  return new Uint8Array(size).map(() => random() * 256);
}

function pair(options?: PipeOptions): { server: Conn; client: Conn } {
  const [a, b] = createPipe(options);
  return {
    server: new Conn(a, { role: "server" }),
    client: new Conn(b, { role: "client" }),
  };
}

Deno.test("a client's masked copy of a large payload goes back to the pool once written", async () => {
  const { server, client } = pair();
  const zeros = new Uint8Array(MiB);
  await client.writeMessage(MESSAGE_TYPE.Binary, zeros);
  assert.deepEqual((await server.readMessage()).data, zeros);
  // The first test, so the pool held nothing before: memory that is not all
  // zero is the masked copy (the mask key's bytes), not a fresh buffer.
  const reused = new Uint8Array(takePayloadBuffer(MiB));
  assert.ok(reused.some((byte) => byte !== 0));
  assert.equal(zeros.every((byte) => byte === 0), true);
  client.close();
  server.close();
});

Deno.test("a handed-back buffer is detached and its memory taken next", () => {
  const size = MiB + 10;
  const first = takePayloadBuffer(size);
  new Uint8Array(first).fill(0xab);
  handBack(new Uint8Array(first, 10));
  assert.equal(first.detached, true);
  const second = takePayloadBuffer(size);
  assert.notEqual(second, first);
  // A new ArrayBuffer is zeroed: the bytes prove it is the same memory.
  assert.equal(new Uint8Array(second)[size - 1], 0xab);
  handBack(new Uint8Array(second));
  // A buffer much larger than asked for is not used for a small payload.
  const small = takePayloadBuffer(POOLED_PAYLOAD);
  assert.equal(small.byteLength, POOLED_PAYLOAD);
  assert.equal(new Uint8Array(small)[0], 0);
  assert.equal(new Uint8Array(takePayloadBuffer(size))[0], 0xab);
});

Deno.test("the pool keeps at most 32 MiB of free buffers", () => {
  const buffers = Array.from({ length: 40 }, () => takePayloadBuffer(MiB));
  for (const buffer of buffers) {
    new Uint8Array(buffer).fill(7);
    handBack(new Uint8Array(buffer));
  }
  const reused = Array.from({ length: 40 }, () => takePayloadBuffer(MiB))
    .filter((buffer) => new Uint8Array(buffer)[0] === 7).length;
  assert.equal(reused, 32);
});

Deno.test("bytes the library did not lend are left alone", () => {
  const own = new Uint8Array(MiB).fill(1);
  handBack(own);
  assert.equal(own.buffer.detached, false);
  assert.equal(own[0], 1);
  const small = takePayloadBuffer(POOLED_PAYLOAD - 1);
  handBack(new Uint8Array(small));
  assert.equal(small.detached, false);
});

Deno.test("a disposed large message is empty; a small one keeps its bytes", async () => {
  const { server, client } = pair();
  const large = pattern(MiB, 1);
  await client.writeMessage(MESSAGE_TYPE.Binary, large);
  await client.writeMessage(MESSAGE_TYPE.Text, "small");
  const first = await server.readMessage();
  assert.deepEqual(first.data, large);
  first[Symbol.dispose]();
  assert.equal(first.data.length, 0);
  {
    using second = await server.readMessage();
    second[Symbol.dispose]();
    assert.equal(new TextDecoder().decode(second.data), "small");
  }
  client.close();
  server.close();
});

Deno.test("a payload disposed while its echo is queued is sent whole", async () => {
  // A small pipe: the echo's bytes wait in the writer until the client
  // reads them.
  const { server, client } = pair({ capacity: 64 * 1024, maxWrite: 16 * 1024 });
  const sent = [pattern(2 * MiB, 2), pattern(2 * MiB, 3)];
  const writes = Promise.all(
    sent.map((data) => client.writeMessage(MESSAGE_TYPE.Binary, data)),
  );
  for (let i = 0; i < sent.length; i++) {
    using message = await server.readMessage();
    // Not awaited: disposal must wait for this write to finish with the
    // bytes, and the next read must not land in them meanwhile.
    server.writeMessage(message.type, message.data).catch(() => {});
  }
  for (const data of sent) {
    assert.deepEqual((await client.readMessage()).data, data);
  }
  await writes;
  client.close();
  server.close();
});

Deno.test("an echo loop that disposes every message returns each intact", async () => {
  const { server, client } = pair();
  const sizes = [POOLED_PAYLOAD, MiB, 3 * MiB, MiB + 1, 200_000, 2 * MiB];
  const sent = sizes.map((size, i) => pattern(size, 10 + i));
  const echo = (async () => {
    for await (using message of server) {
      await server.writeMessage(message.type, message.data);
    }
  })();
  const received = (async () => {
    const all: Uint8Array[] = [];
    for (let i = 0; i < sent.length; i++) {
      all.push((await client.readMessage()).data);
    }
    return all;
  })();
  for (const data of sent) await client.writeMessage(MESSAGE_TYPE.Binary, data);
  assert.deepEqual(await received, sent);
  await client.closeGracefully();
  await echo;
  server.close();
});
