// The write engine on its own: messages go in, and the bytes it hands its
// transport are read back as frames. No Conn, no reader, no socket.

import assert from "node:assert/strict";
import { CloseSentError, MESSAGE_TYPE } from "../frame.ts";
import { PreparedMessage, Writer } from "../_writer.ts";
import { concatAll, FrameReader, OP, utf8 } from "./_frames.ts";

/** A writer whose transport records every write it is given. */
function writerOf(options: { client?: boolean; bufferSize?: number } = {}) {
  const writes: Uint8Array[] = [];
  const failures: number[] = [];
  const writer = new Writer({
    write(data: Uint8Array): Promise<number> {
      writes.push(data.slice());
      return Promise.resolve(data.length);
    },
  }, {
    client: options.client ?? false,
    bufferSize: options.bufferSize ?? 4096,
    pool: undefined,
    compressionThreshold: -1,
    deflate: undefined,
  }, { fail: (error) => failures.push(error.code) });
  return { writer, writes, failures };
}

/** Every frame written so far. */
function framesOf(writes: Uint8Array[]) {
  const bytes = concatAll(writes);
  let done = false;
  return new FrameReader({
    read(buffer) {
      if (done) return Promise.resolve(null);
      done = true;
      buffer.set(bytes);
      return Promise.resolve(bytes.length);
    },
  }).all();
}

Deno.test("writer: a server's message is one unmasked frame, a client's is masked", async () => {
  for (const client of [false, true]) {
    const { writer, writes } = writerOf({ client });
    await writer.writeMessage(MESSAGE_TYPE.Text, utf8("hi"), true, undefined);
    await writer.flushed();
    const [frame, ...rest] = await framesOf(writes);
    assert.deepEqual(rest, []);
    assert.equal(frame.opcode, OP.text);
    assert.equal(frame.fin, true);
    assert.equal(frame.masked, client);
    assert.equal(new TextDecoder().decode(frame.payload), "hi");
  }
});

Deno.test("writer: frames written during a burst leave in one write once uncorked", async () => {
  const { writer, writes } = writerOf();
  writer.burst = true;
  for (let i = 0; i < 5; i++) {
    await writer.writeMessage(
      MESSAGE_TYPE.Binary,
      new Uint8Array([i]),
      true,
      undefined,
    );
  }
  assert.equal(writes.length, 0);
  writer.uncork();
  await writer.flushed();
  assert.equal(writes.length, 1);
  const frames = await framesOf(writes);
  assert.deepEqual(frames.map((f) => f.payload[0]), [0, 1, 2, 3, 4]);
});

Deno.test("writer: a streamed message goes out in fragments, and later messages wait for it", async () => {
  const { writer, writes } = writerOf({ bufferSize: 200 });
  const stream = writer.nextWriter(MESSAGE_TYPE.Binary);
  const after = writer.writeMessage(
    MESSAGE_TYPE.Text,
    utf8("after"),
    true,
    undefined,
  );
  await stream.write(new Uint8Array(450).fill(7));
  await stream.close();
  await after;
  await writer.flushed();
  const frames = await framesOf(writes);
  assert.deepEqual(
    frames.map((f) => [f.opcode, f.fin, f.payload.length]),
    [[OP.binary, false, 200], [OP.cont, false, 200], [OP.cont, true, 50], [
      OP.text,
      true,
      5,
    ]],
  );
});

Deno.test("writer: a prepared message is written as its frame", async () => {
  const { writer, writes } = writerOf();
  const prepared = new PreparedMessage(
    MESSAGE_TYPE.Binary,
    new Uint8Array([1, 2]),
  );
  await writer.writePrepared(prepared);
  await writer.writePrepared(prepared);
  await writer.flushed();
  const frames = await framesOf(writes);
  assert.deepEqual(frames.map((f) => [...f.payload]), [[1, 2], [1, 2]]);
});

Deno.test("writer: after a close frame only refusals; after close(error) every write rejects with it", async () => {
  const { writer } = writerOf();
  await writer.writeControl(MESSAGE_TYPE.Close, new Uint8Array([3, 232]), 0);
  assert.equal(writer.closeSent, true);
  assert.equal(writer.canReply, false);
  await assert.rejects(
    writer.writeMessage(MESSAGE_TYPE.Text, utf8("late"), true, undefined),
    CloseSentError,
  );
  const error = new Error("closed");
  writer.close(error);
  await assert.rejects(
    writer.writeMessage(MESSAGE_TYPE.Text, utf8("later"), true, undefined),
    (e) => e === error,
  );
});
